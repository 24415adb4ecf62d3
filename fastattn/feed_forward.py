"""The feed-forward op family, in one place: the public call, its validation, the op schemas, their
fake kernels and autograd, and one record per backend.

    feed_forward(x, w1, b1, w2, b2, "relu")           # (..., D) -> (..., D2)

A call's path: `feed_forward` validates once (`FFNCall`), asks fastattn/backends for the record of
the backend that serves it, and that record calls its kernel: `torch.ops.fastattn.ffn_fwd` (C++:
csrc/cpu/ or csrc/cuda/ by the tensors' device), `torch.ops.fastattn.triton_ffn_fwd`
(kernels/feed_forward.py), or the pure-PyTorch reference (fastattn/reference.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _library, _philox, backends
from .backends import Impl
from .reference import ACTIVATIONS, ffn_reference

# ---- op schemas (written once; the C++ extension and the Triton launchers implement them) ----------
# x (T, D) contiguous, w1 (F, D), b1 (F,)?, w2 (D2, F), b2 (D2,)? (nn.Linear layout), activation one of
# ACTIVATIONS, dropout on the hidden after the activation. -> (out (T, D2), saved): saved is the
# pre-activation x @ w1^T + b1 (T, F) when save_for_backward, else an empty (0,) tensor.
# The backward -> (dx, dw1, db1 (F,), dw2, db2 (D2,)), db1/db2 even when a bias is None.
FWD_SCHEMA = ("(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, float dropout_p, "
              "Tensor? seed, bool save_for_backward) -> (Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor saved, "
              "str activation, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _triton_kernels():
    from .kernels import feed_forward as kernels  # imported at first use: `import fastattn` never imports triton

    return kernels.ffn_forward, kernels.ffn_backward


def _fwd_fake(x, w1, b1, w2, b2, activation, dropout_p, seed, save_for_backward):
    saved = x.new_empty(x.shape[0], w1.shape[0]) if save_for_backward else x.new_empty(0)
    return x.new_empty(x.shape[0], w2.shape[0]), saved


def _bwd_fake(grad_out, x, w1, b1, w2, b2, saved, activation, dropout_p, seed):
    return (torch.empty_like(x), torch.empty_like(w1), w1.new_empty(w1.shape[0]), torch.empty_like(w2),
            w2.new_empty(w2.shape[0]))


def _autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        x, w1, b1, w2, b2, activation, dropout_p, seed, _save = inputs
        ctx.save_for_backward(x, w1, b1, w2, b2, output[1], seed)
        ctx.meta = (activation, dropout_p)

    def backward(ctx, grad_out, _grad_saved):
        x, w1, b1, w2, b2, saved, seed = ctx.saved_tensors
        activation, dropout_p = ctx.meta
        if saved.numel() == 0 and x.shape[0] * w1.shape[0] > 0:  # forward ran without saving: recompute
            saved = torch.nn.functional.linear(x, w1, b1)
        dx, dw1, db1, dw2, db2 = bwd_op(grad_out.contiguous(), x, w1, b1, w2, b2, saved, activation, dropout_p,
                                        seed)
        return (dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None,
                None, None, None, None)

    return setup_context, backward


# ffn_fwd/_bwd: C++ kernels per device, their autograd in C++ (csrc/autograd.cpp: no Python on the
# call path); triton_ffn_fwd/_bwd: the launchers above, their autograd from _autograd.
FWD_OPS, BWD_OPS = _library.define_family("ffn", FWD_SCHEMA, BWD_SCHEMA, _triton_kernels,
                                          _fwd_fake, _bwd_fake, _autograd)


# ---- the validated call ------------------------------------------------------------------------------
_fail, _describe = _library.fail, _library.describe


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, type(t).__name__, "a torch.Tensor")
    if t.is_nested:
        _fail(name, "a NestedTensor", "a dense tensor")
    if not t.dtype.is_floating_point:
        _fail(name, _describe(t), "a floating-point tensor (float16, bfloat16, float32 or float64)")


class FFNCall:
    """A validated feed-forward call: x (T, D) contiguous, weights in nn.Linear layout, contiguous."""

    __slots__ = ("x", "w1", "b1", "w2", "b2", "activation", "dropout_p", "seed", "lead_shape")

    def __init__(self, x, w1, b1, w2, b2, activation, dropout_p, seed, lead_shape):
        self.x, self.w1, self.b1, self.w2, self.b2 = x, w1, b1, w2, b2
        self.activation, self.dropout_p, self.seed, self.lead_shape = activation, dropout_p, seed, lead_shape

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.x, self.w1, self.b1, self.w2, self.b2))


def make_call(x, weight1, bias1, weight2, bias2, activation="relu", dropout_p=0.0) -> FFNCall:
    """Validate a call (clear errors naming the argument) and normalise it for the kernels."""
    _check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        _fail("x", _describe(x), "a tensor (..., d_model) with d_model >= 1")
    for name, t in (("weight1", weight1), ("weight2", weight2)):
        _check_tensor(name, t)
        if t.dim() != 2:
            _fail(name, _describe(t), "a 2-D (out_features, in_features) tensor, as nn.Linear.weight")
    d = x.shape[-1]
    f = weight1.shape[0]
    if weight1.shape[1] != d:
        _fail("weight1", f"shape {tuple(weight1.shape)}", f"(dim_feedforward, {d}) to match x's last dim {d}")
    if weight2.shape[1] != f:
        _fail("weight2", f"shape {tuple(weight2.shape)}", f"(d_out, {f}) to match weight1's {f} outputs")
    for name, b, size in (("bias1", bias1, f), ("bias2", bias2, weight2.shape[0])):
        if b is not None:
            _check_tensor(name, b)
            if tuple(b.shape) != (size,):
                _fail(name, f"shape {tuple(b.shape)}", f"None or ({size},)")
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if t is not None and t.dtype != x.dtype:
            _fail(name, f"dtype {t.dtype}", f"x's dtype {x.dtype}")
        if t is not None and t.device != x.device:
            _fail(name, f"device {t.device}", f"x's device {x.device}")
    if activation not in ACTIVATIONS:
        _fail("activation", repr(activation), f"one of {ACTIVATIONS}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        _fail("dropout_p", repr(dropout_p), "a float in [0, 1)")
    dropout_p = float(dropout_p)
    seed = _philox.new_seed(x.device, (x.numel() // d) * f) if dropout_p > 0.0 else None
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return FFNCall(x.reshape(-1, d).contiguous(), contig(weight1), contig(bias1), contig(weight2), contig(bias2),
                   activation, dropout_p, seed, tuple(x.shape[:-1]))


# ---- one record per backend ----------------------------------------------------------------------------
def _op_runner(fwd):
    def run(call: FFNCall) -> torch.Tensor:
        return fwd(call.x, call.w1, call.b1, call.w2, call.b2, call.activation, call.dropout_p, call.seed,
                   call.requires_grad)[0]

    return run


def _run_reference(call: FFNCall) -> torch.Tensor:
    return ffn_reference(call.x, call.w1, call.b1, call.w2, call.b2, call.activation, call.dropout_p, call.seed)


_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
IMPLS: dict[str, Impl] = {
    "cuda": Impl("cuda", ("cuda",), (_F16, _BF16, _F32), _op_runner(FWD_OPS["cpp"]), kernel=("ffn_fwd", "CUDA")),
    "triton": Impl("triton", ("cuda", "cpu") if backends.interpreter_on() else ("cuda",), (_F16, _BF16, _F32),
                   _op_runner(FWD_OPS["triton"]), forced_only_devices=("cpu",)),
    "cpu": Impl("cpu", ("cpu",), (_F32, _BF16, _F64), _op_runner(FWD_OPS["cpp"]), kernel=("ffn_fwd", "CPU")),
    "reference": Impl("reference", ("cpu", "cuda", "meta"), (_F16, _BF16, _F32, _F64), _run_reference),
}
backends.register_family("ffn", IMPLS)


def feed_forward(x, weight1, bias1, weight2, bias2, activation="relu", dropout_p=0.0, *, backend=None):
    """Fused Linear -> activation -> dropout -> Linear.

    x: (..., D); weight1: (F, D); bias1: (F,) or None; weight2: (D2, F); bias2: (D2,) or None
    (nn.Linear's layout). activation: "relu", "gelu" (exact erf) or "gelu_tanh". dropout_p: on the
    hidden activation, seeded from torch's generator. backend: as for scaled_dot_product_attention.
    Returns (..., D2) in x's dtype.
    """
    call = make_call(x, weight1, bias1, weight2, bias2, activation, dropout_p)
    impl = backends.choose("ffn", call.x.device.type, call.x.dtype, explicit=backend)
    out = impl.run(call)
    return out.reshape(*call.lead_shape, out.shape[-1])
