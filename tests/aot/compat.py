"""One place for what ahead-of-time compilation needs from triton's internals, across versions.

Used by tests/aot/attention.py and tests/aot/ffn.py, which
compile kernels with ``triton.compile(make_ast_source(...), target=GPUTarget("cuda", cc, 32))``
on a machine without a GPU or a driver.

triton >= 3.3 (3.6, 3.8 and 3.9 checked): ``ASTSource(fn, signature, constexprs, attrs)``; the
signature names every argument, constexpr ones with the type "constexpr"; constexprs and attrs are
keyed by the argument's index path ``(i,)`` (3.9 also takes names for constexprs; the tuple form is
what every version with ``constexprs`` reads); attrs values are lists of ``[attribute, value]``.
triton 3.0-3.2: ``ASTSource(fn, signature, constants, attrs)``; the signature holds only the runtime
arguments keyed by index, constants are keyed by index, attrs is an ``AttrsDescriptor``.
"""
from __future__ import annotations

import inspect


def make_ast_source(fn, types: dict, constexprs: dict, divisible=()):
    """An ASTSource for the @triton.jit function fn.

    types: {argument name: triton type string ("*fp16", "i32", "fp32", ...)} for every runtime
    argument; constexprs: {argument name: value} for every tl.constexpr argument; divisible: names
    of arguments that carry the 16-divisibility the JIT infers for aligned pointers and integers
    that are multiples of 16."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    missing = [n for n in names if n not in types and n not in constexprs]
    if missing:
        raise KeyError(f"{fn.__name__}: no type or constexpr value for arguments {missing}")
    unknown = [n for n in list(types) + list(constexprs) + list(divisible) if n not in names]
    if unknown:
        raise KeyError(f"{fn.__name__}: no argument named {unknown}")
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        signature = {n: ("constexpr" if n in constexprs else types[n]) for n in names}
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
        consts = {(names.index(n),): constexprs[n] for n in names if n in constexprs}
        return ASTSource(fn, signature, consts, attrs)
    from triton.backends.compiler import AttrsDescriptor  # triton 3.0-3.2

    signature = {names.index(n): t for n, t in types.items() if n not in constexprs}
    constants = {names.index(n): v for n, v in constexprs.items()}
    attrs = AttrsDescriptor.from_dict({"tt.divisibility": [names.index(n) for n in divisible]})
    return ASTSource(fn, signature, constants, attrs)


def runtime_type(value) -> str:
    """The signature type the JIT gives a Python scalar argument (e.g. "u1" for a bool on 3.9),
    asked of triton itself so that an AOT compile types it exactly as a launch would."""
    try:
        from triton.runtime.jit import mangle_type
    except ImportError:  # older spellings
        return {bool: "i1", int: "i32", float: "fp32"}[type(value)]
    return mangle_type(value)
