"""The `fastattn` op namespace and the C++ extension, shared by both op families.

Each family (fastattn/attention.py, fastattn/feed_forward.py) writes its op schemas once, here in
Python, with `LIB.define`; the C++ extension only implements them per device
(`TORCH_LIBRARY_IMPL(fastattn, CPU|CUDA, m)`). So the Triton ops exist and work without `_C`.
"""
from __future__ import annotations

import torch

LIB = torch.library.Library("fastattn", "DEF")

_C = None
_C_ERROR: str | None = None


def fail(arg: str, got, expected: str):
    """The one error style of fastattn's validation: the argument, what it got, what was expected."""
    raise ValueError(f"fastattn: argument '{arg}' got {got}; expected {expected}")


def describe(t: torch.Tensor) -> str:
    return f"a tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def load_extension() -> None:
    """Import fastattn._C once (its kernels attach to the schemas defined here)."""
    global _C, _C_ERROR
    if _C is not None or _C_ERROR is not None:
        return
    try:
        from . import _C as ext
        _C = ext
        from . import _philox

        _philox.setup_cuda_seed_op()  # looked up once, so torch.compile never traces the lookup
    except ImportError as exc:  # a source checkout that was never built, or a broken build
        _C_ERROR = ("fastattn._C is not built (run `make build` or `pip install --no-build-isolation .`)"
                    if "cannot import name '_C'" in str(exc) else f"fastattn._C failed to load: {exc}")


def extension_error() -> str | None:
    """None when fastattn._C is loaded, else why not."""
    load_extension()
    return _C_ERROR


def build_info() -> dict:
    """How fastattn._C was built (compiler, flags, torch, CUDA archs); {} without it."""
    load_extension()
    return dict(_C.build_info()) if _C is not None else {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastattn::op has a kernel for dispatch_key ("CPU", "CUDA") in this process."""
    load_extension()
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key)
    except RuntimeError:
        return False


def define_family(name: str, fwd_schema: str, bwd_schema: str, triton_kernels, fwd_fake, bwd_fake,
                  triton_autograd) -> tuple[dict, dict]:
    """Define one op family's four ops and register what Python owns of them.

    `{name}_fwd` / `{name}_bwd`: implemented in C++ per device (and their autograd in C++);
    `triton_{name}_fwd` / `_bwd`: the Triton launchers `triton_kernels() -> (forward, backward)` returns;
    it is called at each op call, not here, and imports fastattn.kernels there, so `import fastattn`
    never imports triton. Fake kernels for all four; autograd for the Triton forward from
    `triton_autograd(bwd_op) -> (setup_context, backward)`.
    Returns ({"cpp": fwd, "triton": fwd}, {"cpp": bwd, "triton": bwd}) as OpOverloads."""

    def triton_forward(*args):
        return triton_kernels()[0](*args)

    def triton_backward(*args):
        return triton_kernels()[1](*args)

    fwd_ops, bwd_ops = {}, {}
    for which, prefix in (("cpp", ""), ("triton", "triton_")):
        fwd_ops[which] = torch._library.utils.lookup_op(f"fastattn::{LIB.define(prefix + name + '_fwd' + fwd_schema)}")
        bwd_ops[which] = torch._library.utils.lookup_op(f"fastattn::{LIB.define(prefix + name + '_bwd' + bwd_schema)}")
    for key in ("CPU", "CUDA"):
        LIB.impl(fwd_ops["triton"], triton_forward, key)
        LIB.impl(bwd_ops["triton"], triton_backward, key)
    load_extension()  # the C++ kernels of the cpp ops, when built
    for which in ("cpp", "triton"):
        torch.library.register_fake(fwd_ops[which], fwd_fake, lib=LIB)
        torch.library.register_fake(bwd_ops[which], bwd_fake, lib=LIB)
    setup_context, backward = triton_autograd(bwd_ops["triton"])
    torch.library.register_autograd(fwd_ops["triton"], backward, setup_context=setup_context, lib=LIB)
    return fwd_ops, bwd_ops
