"""Drop-in replacements for ``torch.nn.MultiheadAttention`` and ``torch.nn.TransformerEncoderLayer``.

Both keep torch's constructor, forward signature, parameter names and state_dict layout, so weights
load both ways; the attention goes through :func:`fastattn.scaled_dot_product_attention` and the
feed-forward through :func:`fastattn.feed_forward`. :func:`convert` swaps them into an existing model.

Differences from torch, on purpose:

- A query row whose every key is masked gives 0 attention (so the output projection's bias) where
  torch may give NaN (torch 2.11 does). With need_weights=True the module runs torch's own math
  (as torch does there), so that call matches torch exactly, NaN included.
- Dropout inside the attention and the feed-forward draws its mask from fastattn's Philox stream
  (seeded from torch's generator), so it is reproducible with ``torch.manual_seed`` but is not the
  same mask torch's dropout would draw. (On the "cpu" backend a feed-forward of fewer than
  max(256, 4·d_model) tokens runs as torch's own Linear → activation → Dropout → Linear, which is
  faster there; its dropout is then torch's.)

On the "cpu" backend the modules call the C++ ops (``torch.ops.fastattn.attention_fwd`` and
``ffn_fwd``) themselves, on q, k, v viewed as (N, H, L, hd) heads in the projections' rows (self-attention:
one in-projection GEMM, no copy: the CPU op reads strided rows), skipping the public functions' re-validation;
every other backend goes through the public functions. A float32 linear layer with K >= 512
in-features (and >= 2^27 multiply-adds) runs as oneDNN's matmul (torch.ops.mkldnn._linear_pointwise)
instead of torch's addmm (FASTATTN_CPU_ONEDNN_LINEAR=0: off): without autograd (no_grad,
inference_mode) with the activation and residual add fused; while autograd records, the plain linears
(forward and input gradient; _OneDnnLinearFn). Without masks and autograd the encoder layer adds its
residuals into the sublayers' own outputs (no extra buffers).
- ``TransformerEncoderLayer`` is not a subclass of ``nn.TransformerEncoderLayer``: an
  ``nn.TransformerEncoder`` recognises its own layer class to turn padded batches into
  NestedTensors in eval mode; this layer takes dense tensors and a padding mask instead, so the
  encoder must never take that path (``convert`` switches it off; an encoder built around this
  layer never takes it because the layer is not torch's class).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module  # its global forward hooks

import importlib

from . import _philox, attention as _attention, backends as _backends

_ffn = importlib.import_module("fastattn.feed_forward")  # the module (fastattn.feed_forward is the function)

# The modules' direct entries into the C++ kernels (schemas and contract: fastattn/backends/README.md).
# Used only when the chosen backend is "cpu", on tensors the module itself built in the kernels' layout,
# so the public functions' validation and copies are skipped; every other call goes through
# fastattn.scaled_dot_product_attention / fastattn.feed_forward. Module attributes, so tests can spy.
_attention_fwd = torch.ops.fastattn.attention_fwd
_ffn_fwd = torch.ops.fastattn.ffn_fwd


# Float32 linear layers through oneDNN's matmul (torch.ops.mkldnn._linear_pointwise,
# the op torch's inductor emits for CPU linears) where it pays: on a (shared, loaded) 2-core Zen 4 (Genoa) with
# torch's MKL it ran (tokens, K) @ (K, N) GEMMs with K >= 512 and >= 2^27 multiply-adds 1.1-2x faster
# than at::addmm, in the same process; with K <= 256, or at 256 x 1024 x 256, it was no faster (its
# per-call setup). Without autograd it also fuses the activation (relu/gelu) and a residual add into
# the GEMM; while autograd records, the plain linears (the attention's in- and out-projections) run as
# _OneDnnLinearFn. FASTATTN_CPU_ONEDNN_LINEAR=0 (read once) turns it off.
_ONEDNN_LINEAR = (os.environ.get("FASTATTN_CPU_ONEDNN_LINEAR", "1") != "0" and torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_ONEDNN_MIN_K, _ONEDNN_MIN_MACS = 512, 1 << 27
if _ONEDNN_LINEAR:  # module attributes, so tests can spy
    _onednn_linear = torch.ops.mkldnn._linear_pointwise.default
    _onednn_linear_add = torch.ops.mkldnn._linear_pointwise.binary


def _onednn_pays(x: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    """Whether x @ w.T + b (+ activation, residual) goes through oneDNN: see _ONEDNN_LINEAR. Only
    float32 CPU tensors, w and b contiguous (x is made so: the GEMM repays the copy), outside
    torch.compile."""
    if x.shape[-1] < _ONEDNN_MIN_K or not _ONEDNN_LINEAR or x.dtype != torch.float32 or x.device.type != "cpu":
        return False
    return (x.numel() * w.shape[0] >= _ONEDNN_MIN_MACS and w.dtype == torch.float32 and w.is_contiguous()
            and (b is None or (b.dtype == torch.float32 and b.is_contiguous()))
            and not torch.compiler.is_compiling())


class _OneDnnLinearFn(torch.autograd.Function):
    """F.linear(x2, w, b) for 2-D float32 x2 with autograd: the forward GEMM and the input gradient
    (grad @ w, as a linear on w.T's view) through oneDNN, the weight and bias gradients by torch's ops
    (grad.T @ x2, grad summed over rows). Measured on the Zen 4 development machine (2 threads, quiet,
    same process): oneDNN ran the (128, 1024) x (1024, 3072) in-projection of a small batch at ~195
    GFLOP/s against addmm's 130-155, and grad @ w at 190 against mm's 152; the MultiheadAttention train
    step N2 L64 D1024 went from 23.6 to 22.6 ms. Under create_graph (grad enabled in the backward) the
    input gradient is torch's mm, so a double backward stays exact."""

    @staticmethod
    def forward(ctx, x2: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x2, w)
        ctx.has_bias = b is not None
        return _onednn_linear(x2, w, b, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, w = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            if torch.is_grad_enabled() or grad.dtype != torch.float32 or not grad.is_contiguous():
                gx = grad.mm(w)
            else:
                gx = _onednn_linear(grad, w.t(), None, "none", [], "")
        gw = grad.t().mm(x2) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor], act: str = "none", residual: Optional[Tensor] = None
            ) -> Tensor:
    """act(F.linear(x, w, b)) (+ residual), act "none", "relu", "gelu" or "gelu_tanh"; through oneDNN where
    _onednn_pays (activation and residual fused there; with autograd only the plain linear, as
    _OneDnnLinearFn), else torch's ops (the activation in place, so only without autograd unless act is
    "none")."""
    grad = torch.is_grad_enabled()
    if grad and act == "none" and residual is None and _onednn_pays(x, w, b):
        x2 = x.reshape(-1, x.shape[-1])
        return _OneDnnLinearFn.apply(x2, w, b).view(*x.shape[:-1], w.shape[0])
    if not grad and _onednn_pays(x, w, b) and (
            residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()
                                 and residual.shape == x.shape[:-1] + w.shape[:1])):
        x2 = x.reshape(-1, x.shape[-1])
        if residual is not None:
            out = _onednn_linear_add(x2, residual.view(x2.shape[0], -1), w, b, "add")
            if act != "none":
                raise AssertionError("fastattn: _linear fuses an activation or a residual, not both")
        elif act == "none":
            out = _onednn_linear(x2, w, b, "none", [], "")
        else:
            out = _onednn_linear(x2, w, b, "relu" if act == "relu" else "gelu", [],
                                 "" if act == "relu" else ("tanh" if act == "gelu_tanh" else "none"))
        return out.view(*x.shape[:-1], w.shape[0])
    out = F.linear(x, w, b)
    if act == "relu":
        out.relu_()
    elif act != "none":
        torch._C._nn.gelu_(out, approximate="tanh" if act == "gelu_tanh" else "none")
    return out if residual is None else out.add_(residual)


@torch.compiler.assume_constant_result
def _chosen_backend(kind: str, device_type: str, dtype: torch.dtype, e: int, explicit: Optional[str]) -> Optional[str]:
    """The name of the backend the public function would choose for this call, None if none can serve it
    (the public function then raises the error naming the reasons)."""
    forced = _backends._FORCED_STACK[-1] if _backends._FORCED_STACK else None
    key = (kind, device_type, dtype, e, explicit, forced, _backends._ENV_BACKEND)
    hit = _CHOSEN.get(key, _CHOSEN)
    if hit is not _CHOSEN:
        return hit
    _CHOSEN[key] = name = _chosen_backend_uncached(kind, device_type, dtype, e, explicit)
    return name


_CHOSEN: dict = {}  # what decides a choice -> the backend's name (backends' availability is fixed per process)


def _chosen_backend_uncached(kind, device_type, dtype, e, explicit):
    try:
        return _backends.choose(kind, device_type, dtype, e, e, False, explicit).backend
    except (_backends.BackendError, ValueError):
        return None


__all__ = ["MultiheadAttention", "TransformerEncoderLayer", "convert"]


def _mask_kind(mask: Optional[Tensor], name: str) -> Optional[torch.dtype]:
    """None, or the mask's dtype after checking it is bool or floating (as torch requires)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"fastattn: argument '{name}' got {type(mask).__name__}; expected None or a tensor")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise AssertionError(
            f"fastattn: argument '{name}' got dtype {mask.dtype}; expected bool or a floating dtype "
            "(only bool and floating types of masks are supported)")
    return mask.dtype


def _warn_mismatched_masks(kpm: Optional[Tensor], kpm_name: str, mask: Optional[Tensor], mask_name: str):
    # torch warns (and we do likewise) when one mask is bool and the other float.
    if kpm is not None and mask is not None and kpm.dtype != mask.dtype:
        warnings.warn(
            f"Support for mismatched {kpm_name} and {mask_name} is deprecated. "
            "Use same type for both instead.", stacklevel=3)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool (True = masked out, torch.nn's convention) or float mask as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


def _as_bool_if_binary(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A float mask holding only 0 and -inf as the bool mask it stands for (True = masked out).

    nn.TransformerEncoder hands its layers float 0/-inf masks (its canonical form) even when the user
    gave bool ones; turned back into bool, the padding mask reaches the kernels as key_padding_mask,
    so they skip wholly padded key blocks instead of adding a mask. Other float masks stay additive.
    Skipped under torch.compile (the check reads values) and for masks that require grad."""
    if (mask is None or mask.dtype == torch.bool or mask.requires_grad
            or torch.compiler.is_compiling()):
        return mask
    masked = torch.isneginf(mask)
    if bool((masked | (mask == 0)).all()):
        return masked
    return mask


def _pad_last(mask: Optional[Tensor]) -> Optional[Tensor]:
    """Append one visible key column (False for bool masks = not masked, 0 for float masks)."""
    if mask is None:
        return None
    return F.pad(mask, (0, 1), value=False if mask.dtype == torch.bool else 0.0)


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with the attention computed by fastattn.

    Constructor, parameters (``in_proj_weight`` or ``q_proj_weight/k_proj_weight/v_proj_weight``,
    ``in_proj_bias``, ``out_proj``, ``bias_k``, ``bias_v``) and forward are torch's; ``backend``
    (keyword only) picks the fastattn backend (None = automatic).

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False):

    - query (L, N, E) (or (N, L, E) when batch_first, or unbatched (L, E)); key (S, N, kdim);
      value (S, N, vdim).
    - key_padding_mask (N, S) (unbatched: (S,)): bool, True = ignore that key, or float, added.
    - attn_mask (L, S) or (N * num_heads, L, S): bool, True = not allowed to attend, or float, added.
    - is_causal: a hint that attn_mask is causal (torch requires attn_mask with it).
    - Returns (attn_output shaped like query with E features, attn_weights or None).
      need_weights=True computes the weights with torch's own math, exactly as torch does.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, backend=None):
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        if (not need_weights and key_padding_mask is None and attn_mask is None and not is_causal
                and query is key and key is value and isinstance(query, Tensor) and not query.is_nested):
            out = self._forward_self(query)  # the common self-attention call, fewest ops
            if out is not None:
                return out, None
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"fastattn.MultiheadAttention: argument '{name}' got {type(t).__name__}; "
                                "expected a tensor")
            if t.is_nested:
                raise ValueError(f"fastattn.MultiheadAttention: argument '{name}' got a NestedTensor; expected a "
                                 "dense tensor (pad the batch and pass key_padding_mask)")
        _mask_kind(key_padding_mask, "key_padding_mask")
        _mask_kind(attn_mask, "attn_mask")
        if need_weights:  # torch's functional checks the masks and warns about mismatched kinds itself
            return self._forward_with_weights(query, key, value, key_padding_mask, attn_mask,
                                              average_attn_weights, is_causal)
        _warn_mismatched_masks(key_padding_mask, "key_padding_mask", attn_mask, "attn_mask")
        return self._forward_fast(query, key, value, key_padding_mask, attn_mask, is_causal), None

    # -- need_weights=True: torch's own math, so the weights (and output) are exactly torch's ----------
    def _forward_with_weights(self, query, key, value, key_padding_mask, attn_mask, average_attn_weights,
                              is_causal):
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=True, attn_mask=attn_mask,
            use_separate_proj_weight=separate, q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    # -- need_weights=False: projections, then fastattn.scaled_dot_product_attention ----------------
    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask):
        who = "fastattn.MultiheadAttention"
        if query.dim() not in (2, 3):
            raise AssertionError(f"{who}: argument 'query' got a {query.dim()}-D tensor; expected batched 3-D "
                                 "or unbatched 2-D")
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise AssertionError(f"{who}: argument '{name}' got a {t.dim()}-D tensor; expected "
                                     f"{query.dim()}-D like query")
        batched = query.dim() == 3
        if key_padding_mask is not None and key_padding_mask.dim() != (2 if batched else 1):
            raise AssertionError(f"{who}: argument 'key_padding_mask' got a {key_padding_mask.dim()}-D tensor; "
                                 f"expected {'(N, S)' if batched else '(S,)'}")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(f"{who}: argument 'attn_mask' got a {attn_mask.dim()}-D tensor; expected "
                                 "(L, S) or (N * num_heads, L, S)")
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"{who}: argument 'query' got embedding dim {query.shape[-1]}; expected "
                                 f"embed_dim {self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            name, got, want = (("key", key.shape[-1], self.kdim) if key.shape[-1] != self.kdim
                               else ("value", value.shape[-1], self.vdim))
            raise AssertionError(f"{who}: argument '{name}' got feature dim {got}; expected {want}")
        if key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"{who}: argument 'value' got shape {tuple(value.shape)}; expected the "
                                 f"sequence and batch dims of key {tuple(key.shape[:-1])}")

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            b = self.in_proj_bias
            if query is key and key is value:  # self-attention: one packed matmul
                return _linear(query, w, b).chunk(3, dim=-1)
            w_q, w_kv = w[:e], w[e:]
            b_q, b_kv = (None, None) if b is None else (b[:e], b[e:])
            if key is value:
                k, v = _linear(key, w_kv, b_kv).chunk(2, dim=-1)
                return _linear(query, w_q, b_q), k, v
            w_k, w_v = w_kv.chunk(2)
            b_k, b_v = (None, None) if b_kv is None else b_kv.chunk(2)
            return _linear(query, w_q, b_q), _linear(key, w_k, b_k), _linear(value, w_v, b_v)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return (_linear(query, self.q_proj_weight, b_q), _linear(key, self.k_proj_weight, b_k),
                _linear(value, self.v_proj_weight, b_v))

    def _forward_fast(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        batched = query.dim() == 3
        h, e = self.num_heads, self.embed_dim
        hd = e // h
        # Projections and K/V appends stay in the caller's layout: seq-first (L, N, E) when
        # seq_dim == 0, batch-first (N, L, E) when seq_dim == 1 (unbatched input: batch-first, N = 1).
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        seq_dim = 1 if (self.batch_first or not batched) else 0
        l, n = query.shape[seq_dim], query.shape[1 - seq_dim]
        s = key.shape[seq_dim]
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (n, s):
            raise AssertionError(f"fastattn.MultiheadAttention: argument 'key_padding_mask' got shape "
                                 f"{tuple(key_padding_mask.shape)}; expected (batch, source length) = {(n, s)}")
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask.")
        if attn_mask is not None:
            want = (l, s) if attn_mask.dim() == 2 else (n * h, l, s)
            if tuple(attn_mask.shape) != want:
                raise RuntimeError(f"fastattn.MultiheadAttention: argument 'attn_mask' got shape "
                                   f"{tuple(attn_mask.shape)}; expected {want}")
        # As torch: with the causal hint and no padding mask, the hint replaces the mask.
        if is_causal and key_padding_mask is None:
            attn_mask = None
        else:
            is_causal = False

        q, k, v = self._project(query, key, value)
        extra_shape = (1, n, e) if seq_dim == 0 else (n, 1, e)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, e).expand(extra_shape)], dim=seq_dim)
            v = torch.cat([v, self.bias_v.reshape(1, 1, e).expand(extra_shape)], dim=seq_dim)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        elif self.bias_k is not None or self.bias_v is not None:
            raise AssertionError("fastattn.MultiheadAttention: bias_k and bias_v must both be set or both None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(extra_shape)], dim=seq_dim)
            v = torch.cat([v, v.new_zeros(extra_shape)], dim=seq_dim)
            attn_mask = _pad_last(attn_mask)
            key_padding_mask = _pad_last(key_padding_mask)
        s = k.shape[seq_dim]

        if self._direct_attention(q, attn_mask, key_padding_mask):
            # The C++ kernel on the projections' rows viewed as heads, no copy (it reads strided rows).
            q, k, v = _heads(q, seq_dim, h, hd), _heads(k, seq_dim, h, hd), _heads(v, seq_dim, h, hd)
            mask = _kernel_mask(attn_mask, key_padding_mask, n, h, l, s, q.dtype)
            kpm = None
            if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
                kpm = key_padding_mask.contiguous()
            dropout_p = float(self.dropout) if self.training else 0.0
            seed = _philox.new_seed() if dropout_p > 0.0 else None
            out = _attention_fwd(q, k, v, mask, kpm, dropout_p, is_causal, 1.0 / math.sqrt(hd), seed)[0]
        else:
            out = self._attention_api(q, k, v, attn_mask, key_padding_mask, is_causal, seq_dim, n, h, l, s, hd)
        return self._out_projection(out, seq_dim, batched, n, l, e)

    def _forward_self(self, x: Tensor, residual: Optional[Tensor] = None) -> Optional[Tensor]:
        """Self-attention without masks, bias_k/v or zero attention, on the "cpu" backend: one in-projection
        GEMM, the kernel on q, k, v viewed as heads in its rows (the C++ op reads strided rows and then
        writes its output (N, L, H, hd), which the out-projection reads as is), the out-projection. None
        when the call does not qualify (the general path serves it). residual (only without autograd):
        a tensor shaped like the output, added to it (fused into the out-projection where oneDNN runs it)."""
        # (parameters read from _parameters: this runs per call and nn.Module.__getattr__ is slow)
        params, h, e = self._parameters, self.num_heads, self.embed_dim
        if (x.dim() != 3 or not self._qkv_same_embed_dim or self.bias_k is not None or self.add_zero_attn
                or x.shape[-1] != e
                or _chosen_backend("attention", x.device.type, x.dtype, e // h, self.backend) != "cpu"):
            return None
        hd = e // h
        if self.batch_first:
            n, l = x.shape[0], x.shape[1]
            heads = _linear(x, params["in_proj_weight"], params["in_proj_bias"]).view(n, l, 3, h, hd).permute(
                2, 0, 3, 1, 4)
        else:
            l, n = x.shape[0], x.shape[1]
            heads = _linear(x, params["in_proj_weight"], params["in_proj_bias"]).view(l, n, 3, h, hd).permute(
                2, 1, 3, 0, 4)
        q, k, v = heads.unbind(0)
        dropout_p = float(self.dropout) if self.training else 0.0
        seed = _philox.new_seed() if dropout_p > 0.0 else None
        out = _attention_fwd(q, k, v, None, None, dropout_p, False, 1.0 / math.sqrt(hd), seed)[0]
        # the kernel's output is laid out (N, L, H, hd): the caller's layout viewed as is when batch-first
        out = out.transpose(1, 2).reshape(n, l, e) if self.batch_first else out.permute(2, 0, 1, 3).reshape(l, n, e)
        proj = self._modules["out_proj"]._parameters
        return _linear(out, proj["weight"], proj["bias"], residual=residual)

    def _direct_attention(self, q: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor]) -> bool:
        """Whether this call goes straight to the C++ kernel: the chosen backend is "cpu" and the masks
        need nothing the API's validation gives (no gradient, same device as the query)."""
        for m in (attn_mask, key_padding_mask):
            if m is not None and (m.requires_grad or m.device != q.device):
                return False
        return _chosen_backend("attention", q.device.type, q.dtype, self.embed_dim // self.num_heads,
                               self.backend) == "cpu"

    def _attention_api(self, q, k, v, attn_mask, key_padding_mask, is_causal, seq_dim, n, h, l, s, hd):
        # -> (N, H, seq, hd), the API's layout
        if seq_dim == 0:
            q = q.reshape(l, n, h, hd).permute(1, 2, 0, 3)
            k = k.reshape(s, n, h, hd).permute(1, 2, 0, 3)
            v = v.reshape(s, n, h, hd).permute(1, 2, 0, 3)
        else:
            q = q.reshape(n, l, h, hd).transpose(1, 2)
            k = k.reshape(n, s, h, hd).transpose(1, 2)
            v = v.reshape(n, s, h, hd).transpose(1, 2)

        # torch.nn's bool masks mean True = masked out; the API's bool attn_mask means True = keep.
        sdpa_mask = None
        if attn_mask is not None:
            sdpa_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
            if sdpa_mask.dim() == 3:
                sdpa_mask = sdpa_mask.reshape(n, h, l, s)
        kpm = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                kpm = key_padding_mask  # kept apart so kernels can skip padded key blocks
            else:  # a float padding mask is added to the scores like any other mask
                add = key_padding_mask.reshape(n, 1, 1, s)
                if sdpa_mask is None:
                    sdpa_mask = add
                else:
                    sdpa_mask = _additive(~sdpa_mask if sdpa_mask.dtype == torch.bool else sdpa_mask,
                                          q.dtype) + add
        dropout_p = self.dropout if self.training else 0.0
        return _attention.scaled_dot_product_attention(q, k, v, sdpa_mask, dropout_p, is_causal,
                                                key_padding_mask=kpm, backend=self.backend)

    def _out_projection(self, out: Tensor, seq_dim: int, batched: bool, n: int, l: int, e: int,
                        residual: Optional[Tensor] = None) -> Tensor:
        # (N, H, L, hd) -> the caller's layout (one copy), then the output projection as torch's
        # functional does it (F.linear on out_proj's parameters)
        if seq_dim == 0:
            out = out.permute(2, 0, 1, 3).reshape(l, n, e)
        else:
            out = out.transpose(1, 2).reshape(n, l, e)
        if residual is not None:
            return _linear(out, self.out_proj.weight, self.out_proj.bias, residual=residual)
        out = _linear(out, self.out_proj.weight, self.out_proj.bias)
        return out if batched else out.squeeze(0)


def _heads(x: Tensor, seq_dim: int, h: int, hd: int) -> Tensor:
    """(seq, N, E) (seq_dim 0) or (N, seq, E) -> an (N, H, seq, hd) view (its last dim contiguous: the C++
    CPU op reads it in place; a projection's chunk may have rows apart, so reshape, not view)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    x = x.reshape(x.shape[0], x.shape[1], h, hd)
    return x.permute(1, 2, 0, 3) if seq_dim == 0 else x.transpose(1, 2)


def _kernel_mask(attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], n: int, h: int, l: int,
                 s: int, dtype: torch.dtype) -> Optional[Tensor]:
    """torch.nn's masks (bool True = masked out, or float added) as the kernels' additive mask: an
    expanded (N, H, L, S) view of `dtype` (strides may be 0), or None. A bool padding mask stays apart."""
    add = None
    if attn_mask is not None:
        add = _additive(attn_mask, dtype).to(dtype)
        add = add.expand(n, h, l, s) if add.dim() == 2 else add.view(n, h, l, s)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        pad = key_padding_mask.to(dtype).view(n, 1, 1, s)
        add = pad.expand(n, h, l, s) if add is None else add + pad
    return add


def _activation_name(activation) -> Optional[str]:
    """The fastattn.feed_forward activation name for torch's relu/gelu spellings, else None."""
    if activation is F.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is F.gelu:
        return "gelu"
    if isinstance(activation, nn.GELU):
        return "gelu_tanh" if activation.approximate == "tanh" else "gelu"
    return None


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast gives linear layers on x's device, or None when autocast is off there."""
    device_type = x.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class TransformerEncoderLayer(nn.Module):
    """``torch.nn.TransformerEncoderLayer`` with attention and feed-forward computed by fastattn.

    Same constructor, submodules (self_attn, linear1, dropout, linear2, norm1, norm2, dropout1,
    dropout2, activation) and state_dict as torch's; ``backend`` (keyword only) picks the fastattn
    backend. ``self_attn`` is a :class:`fastattn.MultiheadAttention`. The feed-forward is one
    :func:`fastattn.feed_forward` call when the activation is relu or gelu (``"relu"``, ``"gelu"``,
    ``F.relu``, ``F.gelu``, ``nn.ReLU()``, ``nn.GELU()``, ``nn.GELU(approximate="tanh")``), except on
    the "cpu" backend below its break-even token count (torch's Linear → activation → Linear there);
    any other callable runs as plain torch ops.

    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False): src (S, N, E) (or
    (N, S, E) when batch_first, or unbatched (S, E)); src_mask (S, S) or (N * nhead, S, S), bool
    (True = not allowed) or float (added); src_key_padding_mask (N, S), bool (True = padding) or float.
    Returns a tensor shaped like src. NestedTensors are refused: pass a padded batch and a mask.
    To stack it yourself, build ``nn.TransformerEncoder(layer, n, enable_nested_tensor=False)`` (the
    NestedTensor path is torch's own layer's; torch warns when it is asked for with another layer).
    """

    __constants__ = ["norm_first"]

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: Union[str, Callable[[Tensor], Tensor]] = F.relu, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None,
                 *, backend: Optional[str] = None) -> None:
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            backend=backend, **factory)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **factory)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps, bias=bias, **factory)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        if isinstance(activation, str):
            if activation not in ("relu", "gelu"):
                raise RuntimeError(f"fastattn.TransformerEncoderLayer: argument 'activation' got {activation!r}; "
                                   "expected 'relu', 'gelu' or a callable")
            activation = F.relu if activation == "relu" else F.gelu
        # torch's flag, kept for code that reads it: 1 = relu, 2 = gelu, 0 = other.
        if activation is F.relu or isinstance(activation, nn.ReLU):
            self.activation_relu_or_gelu = 1
        elif activation is F.gelu or isinstance(activation, nn.GELU):
            self.activation_relu_or_gelu = 2
        else:
            self.activation_relu_or_gelu = 0
        self.activation = activation
        self._backend = backend

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = name
        self.self_attn.backend = name

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}, backend={self._backend!r}"

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        if (src_mask is None and src_key_padding_mask is None and not is_causal and type(src) is Tensor
                and not torch.is_grad_enabled()):
            out = self._forward_no_grad(src)  # the common inference call, fewest ops and no extra buffers
            if out is not None:
                return out
        if not isinstance(src, Tensor):
            raise TypeError(f"fastattn.TransformerEncoderLayer: argument 'src' got {type(src).__name__}; "
                            "expected a tensor")
        if src.is_nested:
            raise ValueError("fastattn.TransformerEncoderLayer: argument 'src' got a NestedTensor; expected a dense "
                             "padded tensor with src_key_padding_mask (inside nn.TransformerEncoder, build it with "
                             "enable_nested_tensor=False or use fastattn.convert)")
        _mask_kind(src_key_padding_mask, "src_key_padding_mask")
        _mask_kind(src_mask, "src_mask")
        if (src_key_padding_mask is not None and src_mask is not None
                and src_key_padding_mask.dtype != src_mask.dtype):
            # torch warns, then adds both as float masks; so do we (the attention then sees one kind).
            _warn_mismatched_masks(src_key_padding_mask, "src_key_padding_mask", src_mask, "src_mask")
            src_key_padding_mask = _additive(src_key_padding_mask, src.dtype)
            src_mask = _additive(src_mask, src.dtype)
        src_key_padding_mask = _as_bool_if_binary(src_key_padding_mask)
        src_mask = _as_bool_if_binary(src_mask)
        # Otherwise the masks go to self_attn as given: a bool padding mask stays bool, so kernels
        # can skip wholly padded key blocks.
        x = src
        if self.norm_first:
            x = x + self._sa_block(_norm(self.norm1, x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(_norm(self.norm2, x))
        else:
            x = _norm(self.norm1, x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = _norm(self.norm2, x + self._ff_block(x))
        return x

    def _forward_no_grad(self, src: Tensor) -> Optional[Tensor]:
        """forward(src) without masks while autograd records nothing: self-attention through
        MultiheadAttention._forward_self, the feed-forward through _ff_no_grad, each residual added
        into the sublayer's own fresh output (fused into its last GEMM where oneDNN runs it, else in
        place: x + y and y + x are the same floats), the activation in place, so no extra (tokens,
        d_model) or hidden buffer is made. None when the call does not qualify (masks, hooks, another
        attention class, 2-D or NestedTensor input, autocast): forward's general path serves it.
        Submodules are read from _modules (nn.Module.__getattr__ is slow: this runs per call)."""
        mods = self._modules
        attn = mods["self_attn"]
        if (src.dim() != 3 or src.is_nested or type(attn) is not MultiheadAttention or not _unhooked(attn)
                or _autocast_dtype(src) is not None):
            return None
        norm1, norm2 = mods["norm1"], mods["norm2"]
        norm_first = self.norm_first
        if norm_first and not _plain_norm(norm1):  # norm1 runs first: it must not run twice
            return None
        dropout1 = mods["dropout1"]
        fuse = _identity_dropout(dropout1)
        sa = attn._forward_self(_norm(norm1, src) if norm_first else src, src if fuse else None)
        if sa is None:
            return None
        x = sa if fuse else src + dropout1(sa)
        if not norm_first:
            x = _norm(norm1, x)
        y = _norm(norm2, x) if norm_first else x
        dropout2 = mods["dropout2"]
        fuse = _identity_dropout(dropout2)
        ff = self._ff_no_grad(y, x if fuse else None)
        if ff is None:  # an activation fastattn does not name, or the public function's path
            x = x + self._ff_block(y)
        else:
            x = ff if fuse else x + dropout2(ff)
        return x if norm_first else _norm(norm2, x)

    def _ff_no_grad(self, x: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        """The feed-forward (before dropout2) plus residual (when given) as a new tensor, without
        autograd: below the fused CPU op's break-even (_ffn_small) Linear -> activation -> Dropout ->
        Linear through _linear, else the fused C++ op where it serves; None when neither applies
        (_ff_block serves it)."""
        name = _activation_name(self.activation)
        if name is None:
            return None
        mods = self._modules
        p1, p2 = mods["linear1"]._parameters, mods["linear2"]._parameters
        w1, b1, w2, b2 = p1["weight"], p1["bias"], p2["weight"], p2["bias"]
        d = x.shape[-1]
        if (_ffn_small(x.numel() // d if d else 0, d, w1.shape[0]) and not torch.compiler.is_compiling()
                and _chosen_backend("ffn", x.device.type, x.dtype, 0, self._backend) == "cpu"):
            return _linear(_dropout(mods["dropout"], _linear(x, w1, b1, name)), w2, b2, residual=residual)
        out = _ffn_direct(x, w1, b1, w2, b2, name, mods["dropout"].p if self.training else 0.0, self._backend)
        if out is None or out is _SMALL:
            return None
        return out if residual is None else out.add_(residual)

    def _sa_block(self, x: Tensor, attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor],
                  is_causal: bool) -> Tensor:
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                           need_weights=False, is_causal=is_causal)[0]
        return _dropout(self.dropout1, x)

    def _ff_block(self, x: Tensor) -> Tensor:
        name = _activation_name(self.activation)
        if name is None:
            x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        else:
            p = self.dropout.p if self.training else 0.0
            w1, b1, w2, b2 = self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias
            dtype = _autocast_dtype(x)
            if dtype is not None:  # the fused op is not autocast-aware: cast as autocast casts nn.Linear
                x, w1, b1, w2, b2 = (None if t is None else t.to(dtype) for t in (x, w1, b1, w2, b2))
            out = _ffn_direct(x, w1, b1, w2, b2, name, p, self._backend)
            if out is _SMALL:  # few tokens: Linear -> activation -> Dropout -> Linear is faster (the linears
                # through oneDNN where it pays: _linear)
                h = _linear(x, w1, b1)
                h = F.relu(h) if name == "relu" else F.gelu(h, approximate="tanh" if name == "gelu_tanh" else "none")
                return _dropout(self.dropout2, _linear(_dropout(self.dropout, h), w2, b2))
            x = out if out is not None else _ffn.feed_forward(x, w1, b1, w2, b2, name, p, backend=self._backend)
        return _dropout(self.dropout2, x)


def _unhooked(module: nn.Module) -> bool:
    """No forward hooks on the module nor global ones: calling its function directly is the same call."""
    return not (module._forward_hooks or module._forward_pre_hooks or _torch_module._global_forward_hooks
                or _torch_module._global_forward_pre_hooks)


def _dropout(module: nn.Module, x: Tensor) -> Tensor:
    """module(x), skipped where it is torch's nn.Dropout acting as the identity (eval, or p == 0)."""
    return x if _identity_dropout(module) else module(x)


def _identity_dropout(module: nn.Module) -> bool:
    """Whether module is torch's nn.Dropout acting as the identity (eval, or p == 0) with no hooks."""
    return type(module) is nn.Dropout and (not module.training or module.p == 0.0) and _unhooked(module)


def _plain_norm(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm and _unhooked(module)


def _norm(module: nn.Module, x: Tensor) -> Tensor:
    """module(x); torch's nn.LayerNorm as F.layer_norm on its parameters (no module call overhead)."""
    if _plain_norm(module):  # torch.layer_norm: F.layer_norm less its __torch_function__ check (plain tensors)
        params = module._parameters
        if type(x) is Tensor:
            return torch.layer_norm(x, module.normalized_shape, params["weight"], params["bias"], module.eps)
        return F.layer_norm(x, module.normalized_shape, params["weight"], params["bias"], module.eps)
    return module(x)


_SMALL = object()


def _ffn_small(tokens: int, d_model: int, d_ff: int = 0) -> bool:
    """Whether two GEMMs (through _linear: oneDNN where it pays) beat the fused CPU feed-forward: it lays
    both weights out afresh on every call (2·D·F copies), which the GEMMs of fewer than ~4·D tokens (at
    least 256) do not repay (measured on a Zen 4 (Genoa) with MKL, fp32: D 64 crosses at 128-256 tokens,
    D 256 at ~1024); and its 64-token tiles lose to whole-matrix GEMMs once the weights are large
    (D·F >= 2^20; same machine, fp32, forward+backward: D 512 F 2048 at 4096 tokens 0.81-0.86x eager,
    D 1024 F 4096 at 2048 tokens 0.38x)."""
    return tokens < 256 or tokens < 4 * d_model or d_model * d_ff >= (1 << 20)


def _ffn_direct(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str,
                dropout_p: float, backend: Optional[str]):
    """The feed-forward straight through the C++ kernel when the "cpu" backend serves it and the
    tensors are already what the kernel takes (one dtype, contiguous, 2-D+ x); _SMALL when the
    "cpu" backend serves it but the call has too few tokens to repay the kernel (see _ffn_small);
    else None (the public function serves it)."""
    dtype = x.dtype
    if (x.dim() < 2 or not x.is_contiguous() or w1.dim() != 2 or w2.dim() != 2 or w1.shape[1] != x.shape[-1]
            or w2.shape[1] != w1.shape[0]):
        return None
    for t in (w1, b1, w2, b2):
        if t is not None and (t.dtype != dtype or t.device != x.device or not t.is_contiguous()):
            return None
    if _chosen_backend("ffn", x.device.type, dtype, 0, backend) != "cpu":
        return None
    if _ffn_small(x.numel() // x.shape[-1], x.shape[-1], w1.shape[0]) and not torch.compiler.is_compiling():
        return _SMALL
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w1, b1, w2, b2))
    seed = _philox.new_seed() if dropout_p > 0.0 else None
    d = x.shape[-1]
    out = _ffn_fwd(x.view(-1, d), w1, b1, w2, b2, activation, float(dropout_p), seed, save)[0]
    return out.view(*x.shape[:-1], out.shape[-1])


# -- convert ----------------------------------------------------------------------------------------

def _convert_mha(old: nn.MultiheadAttention, backend: Optional[str]) -> MultiheadAttention:
    new = MultiheadAttention(old.embed_dim, old.num_heads, dropout=old.dropout, bias=old.in_proj_bias is not None,
                             add_bias_kv=old.bias_k is not None, add_zero_attn=old.add_zero_attn, kdim=old.kdim,
                             vdim=old.vdim, batch_first=old.batch_first, device="meta", backend=backend)
    # Take the very same Parameter objects (and out_proj module): weights, device, dtype,
    # requires_grad and any optimizer that already holds them all stay valid.
    if set(new._parameters) != set(old._parameters):
        raise RuntimeError(f"fastattn.convert: nn.MultiheadAttention has parameters {sorted(old._parameters)}; "
                           f"expected {sorted(new._parameters)}")
    for name, p in old._parameters.items():
        new._parameters[name] = p
    for name, b in old._buffers.items():
        new._buffers[name] = b
    new.out_proj = old.out_proj
    new.training = old.training
    return new


def _convert_layer(old: nn.TransformerEncoderLayer, backend: Optional[str]) -> TransformerEncoderLayer:
    attn = old.self_attn
    new = TransformerEncoderLayer(attn.embed_dim, attn.num_heads, old.linear1.out_features, old.dropout.p,
                                  activation=old.activation, layer_norm_eps=old.norm1.eps,
                                  batch_first=attn.batch_first, norm_first=old.norm_first,
                                  bias=old.linear1.bias is not None, device="meta", backend=backend)
    # Reuse torch's own submodules (same Parameters, eps, dropout p, mode), the attention converted.
    new.self_attn = attn if isinstance(attn, MultiheadAttention) else _convert_mha(attn, backend)
    new.self_attn.backend = backend
    for name in ("linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"):
        setattr(new, name, getattr(old, name))
    new.activation = old.activation  # a module activation (nn.GELU) stays a registered submodule
    new.activation_relu_or_gelu = getattr(old, "activation_relu_or_gelu", new.activation_relu_or_gelu)
    new.training = old.training
    return new


def _convert_one(m: nn.Module, backend: Optional[str]) -> nn.Module:
    if type(m) is nn.TransformerEncoderLayer:  # subclasses may override forward: only their insides convert
        return _convert_layer(m, backend)
    if isinstance(m, nn.MultiheadAttention) and not isinstance(m, MultiheadAttention):
        return _convert_mha(m, backend)
    if isinstance(m, (MultiheadAttention, TransformerEncoderLayer)):
        m.backend = backend
    return m


def convert(module: nn.Module, *, backend: Optional[str] = None) -> nn.Module:
    """Swap fastattn's layers into ``module``, in place, and return it.

    Every ``nn.TransformerEncoderLayer`` (exact class) becomes a :class:`TransformerEncoderLayer` and
    every other ``nn.MultiheadAttention`` a :class:`MultiheadAttention`, found recursively. The new
    layers hold the very same Parameter objects, so weights, device, dtype, requires_grad and an
    optimizer built earlier all carry over; train/eval mode is kept. Every ``nn.TransformerEncoder``
    inside gets ``use_nested_tensor = False``, so it never hands NestedTensors to the new layers.
    ``backend`` (None = automatic) is given to every converted layer. If ``module`` itself is one of
    those layers the converted layer is returned (use the return value).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"fastattn.convert: argument 'module' got {type(module).__name__}; expected an nn.Module")
    root = _convert_one(module, backend)
    stack = [root]
    while stack:
        parent = stack.pop()
        if isinstance(parent, nn.TransformerEncoder):
            parent.use_nested_tensor = False
            parent.enable_nested_tensor = False
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            new = _convert_one(child, backend)
            if new is not child:
                setattr(parent, name, new)
            stack.append(new)
    return root
