"""fastattn as a Hugging Face transformers attention implementation.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()                                   # name="fastattn"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")
    # or: Model._from_config(config, attn_implementation="fastattn"); model.set_attn_implementation("fastattn")

What a model passes and how it is served (transformers calls ``attention_forward`` once per layer):
- query (B, Hq, L, D), key/value (B, Hkv, S, D) — straight to fastattn's kernels with
  ``enable_gqa=True`` when Hkv < Hq (no repeat_kv copies).
- the mask: the registered mask function is transformers' own ``sdpa_mask`` (a boolean
  (B, 1, L, S) keep mask, or None when the call is purely causal): causal, left/right padding,
  packed sequences, the decode step against the KV cache (L = 1, S = cache length), and sliding
  windows. ``is_causal`` is used when there is no mask and L > 1 (top-left, like torch's SDPA).
- sliding window: served by fastattn's kernels through that mask, which carries the window (the
  kernels have no local-window feature, so a sliding layer costs a full S-wide pass). A sliding
  layer that arrives without a mask while S exceeds the window cannot be served that way and goes
  to transformers' "sdpa" implementation with a one-time warning.
- ``dropout`` (the model passes its attention dropout in training, 0 in eval) from torch's
  generator; ``scaling``; output (B, L, Hq, D) contiguous, and no attention weights.
- position_bias (T5-style models) is handed to transformers' sdpa function under
  ``fastattn.enable_sdpa()``, so fastattn's kernels still run; ``softcap`` raises like "sdpa" does.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import scaled_dot_product_attention
from .. import sdpa as _sdpa

logger = logging.getLogger(__name__)
_warned: set[str] = set()
_BACKEND: dict[str, Optional[str]] = {}  # registered name -> fastattn backend (None = automatic)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def _sdpa_fallback(module, query, key, value, attention_mask, *, with_fastattn: bool, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not with_fastattn:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    with _sdpa.enable_sdpa():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, sliding_window: Optional[int] = None,
                      position_bias: Optional[torch.Tensor] = None, *, _fastattn_backend: Optional[str] = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """One layer's attention for transformers' AttentionInterface.

    query: (B, Hq, L, D); key, value: (B, Hkv, S, D) with Hq % Hkv == 0; attention_mask: None, a bool
    (B, 1, L, S) keep mask (True = attend) or a float additive mask. Returns ((B, L, Hq, D), None).
    """
    if kwargs.get("softcap") is not None:
        raise ValueError("fastattn: argument 'softcap' got a value; expected None (fastattn's kernels have no "
                         "logit soft-capping; use attn_implementation='eager' for this model)")
    if kwargs.get("output_attentions", False):
        _warn_once("output_attentions", "fastattn: attention weights are not returned (output_attentions=True "
                   "needs attn_implementation='eager')")
    if position_bias is not None:
        _warn_once("position_bias", "fastattn: a model with position_bias runs transformers' 'sdpa' attention "
                   "function with fastattn.enable_sdpa() serving its SDPA calls")
        return _sdpa_fallback(module, query, key, value, attention_mask, with_fastattn=True, dropout=dropout,
                              scaling=scaling, is_causal=is_causal, position_bias=position_bias, **kwargs)
    q_length, kv_length = query.shape[2], key.shape[2]
    if attention_mask is None and sliding_window is not None and kv_length > sliding_window:
        _warn_once("sliding_window", f"fastattn: a sliding-window layer (window {sliding_window}) without a mask "
                   "is handed to attn_implementation='sdpa'")
        return _sdpa_fallback(module, query, key, value, attention_mask, with_fastattn=False, dropout=dropout,
                              scaling=scaling, is_causal=is_causal, sliding_window=sliding_window, **kwargs)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers leaves the mask out of purely causal calls; a decode step (L == 1) sees every key.
    is_causal = bool(is_causal) and attention_mask is None and q_length > 1
    if attention_mask is not None and attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
        attention_mask = attention_mask.to(query.dtype)
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=float(dropout),
                                       is_causal=is_causal, scale=scaling,
                                       enable_gqa=key.shape[1] != query.shape[1], backend=_fastattn_backend)
    return out.transpose(1, 2).contiguous(), None


def _mask_function():
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask


def register(name: str = "fastattn", backend: Optional[str] = None) -> str:
    """Register fastattn with transformers as attn_implementation ``name``; returns ``name``.

    Registers the attention function with ``transformers.AttentionInterface`` and transformers'
    boolean SDPA mask builder with ``AttentionMaskInterface`` (without a mask function transformers
    would pass no mask at all). backend: a fastattn backend name for every call, or None (automatic).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"fastattn: argument 'name' got {name!r}; expected a non-empty string")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError("fastattn: the transformers integration needs transformers "
                          "(pip install 'fastattn[transformers]')") from exc
    _BACKEND[name] = backend
    if backend is None:
        fn = attention_forward
    else:
        def fn(*args, **kwargs):
            return attention_forward(*args, _fastattn_backend=backend, **kwargs)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, _mask_function())
    return name


__all__ = ["register", "attention_forward"]
