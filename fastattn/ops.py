"""Registration of fastattn's custom ops: fake kernels and autograd for every op, and the Triton ops.

The C++ ops (fastattn::attention_fwd/_bwd, ffn_fwd/_bwd) are declared in csrc/fastattn.cpp and
implemented per device in C++. The Triton ops (fastattn::triton_*) are declared here with the same
schemas; their bodies are the launchers in fastattn.kernels. Each forward op gets a fake kernel (so
torch.compile and meta tensors see shapes) and an autograd formula whose backward is itself a
registered op, so a compiled graph holds the forward and backward ops whole.
"""
from __future__ import annotations

import importlib

import torch

_C = None
_C_ERROR: str | None = None
try:
    from . import _C  # noqa: F811  (defines the fastattn op namespace)
except ImportError as exc:  # a source checkout that was never built
    _C_ERROR = ("fastattn._C is not built (run `make build` or `pip install --no-build-isolation .`)"
                if "cannot import name '_C'" in str(exc) else f"fastattn._C failed to load: {exc}")


def extension_error() -> str | None:
    return _C_ERROR


def build_info() -> dict:
    return dict(_C.build_info()) if _C is not None else {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{op}", dispatch_key)
    except RuntimeError:
        return False


ATTN_FWD = ("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, "
            "bool is_causal, float scale, Tensor? seed) -> (Tensor, Tensor)")
ATTN_BWD = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
            "Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, Tensor? seed) "
            "-> (Tensor, Tensor, Tensor)")
FFN_FWD = ("(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, float dropout_p, "
           "Tensor? seed, bool save_for_backward) -> (Tensor, Tensor)")
FFN_BWD = ("(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor saved, "
           "str activation, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")

# A fragment of the fastattn namespace: works whether or not the C++ extension defined it.
_lib = torch.library.Library("fastattn", "FRAGMENT")


def _kernel(module: str, fn: str):
    def call(*args):
        mod = importlib.import_module(f"fastattn.kernels.{module}")
        return getattr(mod, fn)(*args)

    call.__name__ = fn
    return call


# The Triton ops: same schemas, bodies from fastattn.kernels (imported at first call, so importing
# fastattn never imports triton nor touches a GPU).
for _name, _schema, _module, _fn in (
    ("triton_attention_fwd", ATTN_FWD, "attention", "attention_forward"),
    ("triton_attention_bwd", ATTN_BWD, "attention", "attention_backward"),
    ("triton_ffn_fwd", FFN_FWD, "feed_forward", "ffn_forward"),
    ("triton_ffn_bwd", FFN_BWD, "feed_forward", "ffn_backward"),
):
    _lib.define(_name + _schema)
    for _key in ("CPU", "CUDA"):
        _lib.impl(_name, _kernel(_module, _fn), _key)


# ---- fake kernels --------------------------------------------------------------------------------
def _attention_fwd_fake(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
    n, hq, l, _ = q.shape
    return q.new_empty(n, hq, l, v.shape[-1]), q.new_empty(n, hq, l, dtype=torch.float32)


def _attention_bwd_fake(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal,
                        scale, seed):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _ffn_fwd_fake(x, w1, b1, w2, b2, activation, dropout_p, seed, save_for_backward):
    saved = x.new_empty(x.shape[0], w1.shape[0]) if save_for_backward else x.new_empty(0)
    return x.new_empty(x.shape[0], w2.shape[0]), saved


def _ffn_bwd_fake(grad_out, x, w1, b1, w2, b2, saved, activation, dropout_p, seed):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


# ---- autograd ------------------------------------------------------------------------------------
def _attention_autograd(bwd_name: str):
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, kpm, seed)
        ctx.meta = (dropout_p, is_causal, scale)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, attn_mask, kpm, seed = ctx.saved_tensors
        dropout_p, is_causal, scale = ctx.meta
        dq, dk, dv = getattr(torch.ops.fastattn, bwd_name)(grad_out.contiguous(), q, k, v, out, lse, attn_mask,
                                                           kpm, dropout_p, is_causal, scale, seed)
        return dq, dk, dv, None, None, None, None, None, None

    return setup_context, backward


def _ffn_autograd(bwd_name: str):
    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, activation, dropout_p, seed, _save = inputs
        ctx.save_for_backward(x, w1, b1, w2, b2, output[1], seed)
        ctx.meta = (activation, dropout_p)

    def backward(ctx, grad_out, _grad_saved):
        x, w1, b1, w2, b2, saved, seed = ctx.saved_tensors
        activation, dropout_p = ctx.meta
        if saved.numel() == 0 and x.shape[0] * w1.shape[0] > 0:  # forward ran without saving: recompute
            saved = torch.nn.functional.linear(x, w1, b1)
        dx, dw1, db1, dw2, db2 = getattr(torch.ops.fastattn, bwd_name)(
            grad_out.contiguous(), x, w1, b1, w2, b2, saved, activation, dropout_p, seed)
        return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None,
                None, None, None, None)

    return setup_context, backward


def _register(prefix: str) -> None:
    ns = f"fastattn::{prefix}"
    torch.library.register_fake(ns + "attention_fwd", _attention_fwd_fake, lib=_lib)
    torch.library.register_fake(ns + "attention_bwd", _attention_bwd_fake, lib=_lib)
    torch.library.register_fake(ns + "ffn_fwd", _ffn_fwd_fake, lib=_lib)
    torch.library.register_fake(ns + "ffn_bwd", _ffn_bwd_fake, lib=_lib)
    setup, bwd = _attention_autograd(prefix + "attention_bwd")
    torch.library.register_autograd(ns + "attention_fwd", bwd, setup_context=setup, lib=_lib)
    setup, bwd = _ffn_autograd(prefix + "ffn_bwd")
    torch.library.register_autograd(ns + "ffn_fwd", bwd, setup_context=setup, lib=_lib)


_register("triton_")
if _C is not None:
    _register("")
