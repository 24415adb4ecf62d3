"""The public API: validate once, normalise, pick a backend, call its op.

Every error names the argument, what it got and what was expected. Inputs are never modified.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import _philox
from .backends import select_backend
from .reference import ACTIVATIONS


def _fail(arg: str, got, expected: str):
    raise ValueError(f"fastattn: argument '{arg}' got {got}; expected {expected}")


def _describe(t: torch.Tensor) -> str:
    return f"a tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


@dataclass
class AttentionCall:
    """A validated, normalised attention call: what every backend receives.

    q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev), contiguous. attn_mask: None or additive in
    q's dtype, an expanded (N, Hq, L, S) view. key_padding_mask: None or bool (N, S), True = ignore.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn_mask: Optional[torch.Tensor]
    key_padding_mask: Optional[torch.Tensor]
    dropout_p: float
    is_causal: bool
    scale: float
    seed: Optional[torch.Tensor]
    mask_requires_grad: bool
    user_attn_mask: Optional[torch.Tensor]  # as given (reference keeps its autograd)
    squeeze_head: bool  # the user passed 3-D (B, L, E) tensors

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dims(self) -> tuple[int, int]:
        return self.q.shape[-1], self.v.shape[-1]


def _check_tensor(name: str, t, *, floating: bool = True):
    if not isinstance(t, torch.Tensor):
        _fail(name, type(t).__name__, "a torch.Tensor")
    if getattr(t, "is_nested", False):
        _fail(name, "a NestedTensor", "a dense tensor (pad the batch and pass key_padding_mask)")
    if floating and not t.dtype.is_floating_point:
        _fail(name, _describe(t), "a floating-point tensor (float16, bfloat16, float32 or float64)")


def _normalise_mask(attn_mask, dtype, device, target: tuple[int, ...], squeeze_head: bool):
    """User mask (bool keep / float add, broadcastable) -> additive, dtype, expanded (N, Hq, L, S)."""
    _check_tensor("attn_mask", attn_mask, floating=False)
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        _fail("attn_mask", _describe(attn_mask), "a bool (True = keep) or floating (added to scores) tensor")
    if attn_mask.device != device:
        _fail("attn_mask", f"device {attn_mask.device}", f"the query's device {device}")
    user_shape = target if not squeeze_head else (target[0], target[2], target[3])
    try:
        ok = torch.broadcast_shapes(tuple(attn_mask.shape), user_shape) == tuple(user_shape)
    except RuntimeError:
        ok = False
    if not ok or attn_mask.dim() > len(user_shape):
        _fail("attn_mask", f"shape {tuple(attn_mask.shape)}", f"a shape broadcastable to {tuple(user_shape)}")
    mdt = torch.float64 if dtype == torch.float64 else torch.float32  # added at accumulation precision
    if attn_mask.dtype == torch.bool:
        add = torch.zeros(attn_mask.shape, dtype=mdt, device=device).masked_fill(~attn_mask, float("-inf"))
    else:
        add = attn_mask.to(mdt)
    if squeeze_head:  # (…, L, S) of a 3-D call -> (B?, 1, L, S)
        add = add.reshape((1,) * (3 - add.dim()) + tuple(add.shape)).unsqueeze(1)
    else:
        add = add.reshape((1,) * (4 - add.dim()) + tuple(add.shape))
    return add.expand(*target)


def make_attention_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        key_padding_mask=None, enable_gqa=False) -> AttentionCall:
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t)
    if query.dim() not in (3, 4):
        _fail("query", _describe(query), "a 4-D (N, H, L, E) or 3-D (B, L, E) tensor")
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            _fail(name, _describe(t), f"a {query.dim()}-D tensor like query")
        if t.dtype != query.dtype:
            _fail(name, f"dtype {t.dtype}", f"query's dtype {query.dtype}")
        if t.device != query.device:
            _fail(name, f"device {t.device}", f"query's device {query.device}")
    squeeze_head = query.dim() == 3
    q, k, v = (t.unsqueeze(1) if squeeze_head else t for t in (query, key, value))
    n, hq, l, e = q.shape
    if k.shape[0] != n or v.shape[0] != n:
        _fail("key" if k.shape[0] != n else "value", f"batch size {k.shape[0] if k.shape[0] != n else v.shape[0]}",
              f"query's batch size {n}")
    if k.shape[-1] != e:
        _fail("key", f"head dim {k.shape[-1]}", f"query's head dim {e}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        _fail("value", _describe(value), f"the same heads and sequence length as key {tuple(key.shape)}")
    hkv, s = k.shape[1], k.shape[2]
    if hkv != hq:
        if not enable_gqa:
            _fail("key", f"{hkv} heads", f"query's {hq} heads (or pass enable_gqa=True for grouped-query attention)")
        if hq % hkv != 0:
            _fail("key", f"{hkv} heads", f"a divisor of query's {hq} heads for grouped-query attention")
    for name, size in (("query", l), ("key", s)):
        if size == 0:
            _fail(name, "sequence length 0", "a sequence length >= 1")
    if e == 0 or v.shape[-1] == 0:
        _fail("query" if e == 0 else "value", "head dim 0", "a head dim >= 1")
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        _fail("dropout_p", repr(dropout_p), "a float in [0, 1)")
    if not isinstance(is_causal, bool):
        _fail("is_causal", repr(is_causal), "a bool")
    if scale is None:
        scale = 1.0 / math.sqrt(e)
    elif not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail("scale", repr(scale), "None or a finite float")
    target = (n, hq, l, s)
    mask = None
    mask_requires_grad = False
    if attn_mask is not None:
        mask = _normalise_mask(attn_mask, q.dtype, q.device, target, squeeze_head)
        mask_requires_grad = attn_mask.requires_grad
    kpm = None
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, floating=False)
        if key_padding_mask.dtype != torch.bool:
            _fail("key_padding_mask", _describe(key_padding_mask), "a bool tensor (True = ignore that key)")
        if tuple(key_padding_mask.shape) != (n, s):
            _fail("key_padding_mask", f"shape {tuple(key_padding_mask.shape)}", f"(batch, key length) = {(n, s)}")
        if key_padding_mask.device != q.device:
            _fail("key_padding_mask", f"device {key_padding_mask.device}", f"the query's device {q.device}")
        kpm = key_padding_mask.contiguous()
    dropout_p = float(dropout_p)
    seed = _philox.new_seed() if dropout_p > 0.0 else None
    return AttentionCall(q.contiguous(), k.contiguous(), v.contiguous(), mask, kpm, dropout_p, is_causal,
                         float(scale), seed, mask_requires_grad, attn_mask, squeeze_head)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, *, key_padding_mask=None, enable_gqa=False, backend=None):
    """Fused scaled-dot-product attention with torch.nn.functional.scaled_dot_product_attention's meaning.

    query: (N, H, L, E) or (B, L, E); key: (N, Hkv, S, E); value: (N, Hkv, S, Ev) (3-D alike).
    attn_mask: bool (True = keep) or float (added to the scores), broadcastable to (N, H, L, S).
    key_padding_mask: bool (N, S), True = that key is ignored (as in nn.MultiheadAttention).
    is_causal: top-left causal mask (query i sees keys j <= i). scale: default 1/sqrt(E).
    enable_gqa: allow Hkv dividing H (grouped-query attention). dropout_p: on the probabilities,
    seeded from torch's generator. A query row whose every key is masked returns 0 (and 0 gradient).
    backend: None (automatic: cuda -> triton -> cpu -> reference) or one of those names.
    Returns (N, H, L, Ev) (or (B, L, Ev)) in query's dtype.
    """
    call = make_attention_call(query, key, value, attn_mask, dropout_p, is_causal, scale,
                               key_padding_mask, enable_gqa)
    out = select_backend("attention", call, backend).attention(call)
    return out.squeeze(1) if call.squeeze_head else out


@dataclass
class FFNCall:
    """A validated feed-forward call: x (T, D) contiguous, weights in nn.Linear layout."""

    x: torch.Tensor
    w1: torch.Tensor
    b1: Optional[torch.Tensor]
    w2: torch.Tensor
    b2: Optional[torch.Tensor]
    activation: str
    dropout_p: float
    seed: Optional[torch.Tensor]
    lead_shape: tuple[int, ...]

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.x, self.w1, self.b1, self.w2, self.b2))


def make_ffn_call(x, weight1, bias1, weight2, bias2, activation="relu", dropout_p=0.0) -> FFNCall:
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
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        _fail("dropout_p", repr(dropout_p), "a float in [0, 1)")
    dropout_p = float(dropout_p)
    seed = _philox.new_seed() if dropout_p > 0.0 else None
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return FFNCall(x.reshape(-1, d).contiguous(), contig(weight1), contig(bias1), contig(weight2), contig(bias2),
                   activation, dropout_p, seed, tuple(x.shape[:-1]))


def feed_forward(x, weight1, bias1, weight2, bias2, activation="relu", dropout_p=0.0, *, backend=None):
    """Fused Linear -> activation -> dropout -> Linear.

    x: (..., D); weight1: (F, D); bias1: (F,) or None; weight2: (D2, F); bias2: (D2,) or None
    (nn.Linear's layout). activation: "relu", "gelu" (exact erf) or "gelu_tanh". dropout_p: on the
    hidden activation, seeded from torch's generator. backend: as for scaled_dot_product_attention.
    Returns (..., D2) in x's dtype.
    """
    call = make_ffn_call(x, weight1, bias1, weight2, bias2, activation, dropout_p)
    out = select_backend("ffn", call, backend).feed_forward(call)
    return out.reshape(*call.lead_shape, out.shape[-1])
