"""The ground truth: plain PyTorch math for attention and the feed-forward block.

Runs in any floating dtype (float64 included) on any device, is differentiable through ordinary
autograd, and is also the last-resort backend. It shares fastattn's meaning exactly: fully masked
query rows give 0 (never NaN) and 0 gradient, and dropout draws the shared Philox stream
(fastattn/_philox.py), so a kernel backend and the reference drop the same elements for a seed.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from . import _philox

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    seed: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    upcast: bool = True,
):
    """Attention by the definition.

    q: (N, Hq, L, E), k: (N, Hkv, S, E), v: (N, Hkv, S, Ev), Hq % Hkv == 0 (GQA).
    attn_mask: None, bool (True = keep) or additive float, broadcastable to (N, Hq, L, S).
    key_padding_mask: None or bool (N, S), True = ignore that key.
    is_causal: top-left causal, query i sees key j iff j <= i.
    seed: int64 tensor (1,) for dropout (required when dropout_p > 0).
    Returns out (N, Hq, L, Ev) in q's dtype [, lse (N, Hq, L) float32, +inf on rows seeing no key].
    Computes in float32 (float64 for float64 inputs); upcast=False computes in q's own dtype, which
    is "PyTorch in the same precision", the yardstick of the tests' error bound.
    """
    n, hq, l, e = q.shape
    hkv, s = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(e)
    ct = _compute_dtype(q.dtype) if upcast else q.dtype
    if hkv != hq:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            # only -inf excludes a key, and takes it out whatever its score (a NaN there stays out)
            m = attn_mask.to(ct)
            scores = torch.where(m == float("-inf"), m, scores + m)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if is_causal:
        above = torch.ones(l, s, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    dead = row_max == float("-inf")  # the row sees no key
    row_max = torch.where(dead, torch.zeros_like(row_max), row_max)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(dead, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("attention_reference: dropout_p > 0 needs a seed tensor")
        keep = _philox.attention_keep_mask(seed, dropout_p, n, hq, l, s, device=q.device)
        p = p * keep.to(ct) / (1.0 - dropout_p)
    out = torch.matmul(p, v.to(ct)).to(q.dtype)
    if not return_lse:
        return out
    lse = (torch.log(denom) + row_max).squeeze(-1).float()
    lse = torch.where(dead.squeeze(-1), torch.full_like(lse, float("inf")), lse)
    return out, lse


def activation_fn(name: str, h: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return F.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    raise ValueError(f"activation: got {name!r}, expected one of {ACTIVATIONS}")


def ffn_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    activation: str = "relu",
    dropout_p: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Linear -> activation -> dropout -> Linear by the definition.

    x: (..., D); w1: (F, D); b1: (F,) or None; w2: (D2, F); b2: (D2,) or None (nn.Linear layout).
    Dropout element (t, f) of the (T, F) hidden, T = x.numel() // D, follows the shared Philox stream.
    Returns (..., D2) in x's dtype.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    h = activation_fn(activation, F.linear(x2, w1, b1))
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("ffn_reference: dropout_p > 0 needs a seed tensor")
        keep = _philox.ffn_keep_mask(seed, dropout_p, h.shape[0], h.shape[1], device=x.device)
        h = h * keep.to(h.dtype) / (1.0 - dropout_p)
    return F.linear(h, w2, b2).reshape(*lead, w2.shape[0])
