"""fastattn's kernels as torch's CUDA flash-attention backend (the FA4-provider pattern).

torch's SDPA dispatcher sends eligible CUDA calls (fp16/bf16, no mask, head dim <= 256) to
``aten::_scaled_dot_product_flash_attention`` and its backward. These kernels replace torch's for
those two ops under the CUDA key, calling ``torch.ops.fastattn.attention_fwd/_bwd`` (CUDA C++) or the
Triton twins. Unlike the kernel for ``aten::scaled_dot_product_attention`` (fastattn/sdpa.py), a
kernel at this level cannot hand a call back (torch's flash kernel is shadowed while the override
stands), so a call it cannot serve raises a RuntimeError naming the reason, as torch's FA4 provider
does. fastattn/sdpa.py registers these only while enabled and only where CUDA kernels exist; with
the higher-level kernel in place they see the calls that reach torch's flash backend anyway (a
tensor subclass such as DTensor unwrapped to local tensors, or a graph that names the flash op).

Layouts: query (B, Hq, L, E), key/value (B, Hkv, S, E) (any strides); logsumexp (B, Hq, L) float32,
natural log, as torch's flash returns it. Dropout: fastattn's Philox seed travels in ``rng_state``
(two uint64 words: the seed's bits, 0), the slot torch's autograd hands back to the backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _philox

FLASH_FWD = "_scaled_dot_product_flash_attention"
FLASH_BWD = "_scaled_dot_product_flash_attention_backward"


def _ops(device_type: str):
    """(forward, backward) ops of fastattn.attention: the C++ kernels where this build has them for
    the device, else the Triton ones."""
    from . import _library, attention

    which = "cpp" if _library.has_kernel("attention_fwd", device_type.upper()) else "triton"
    return attention.FWD_OPS[which], attention.BWD_OPS[which]


def _support_error(query, key, value, dropout_p, return_debug_mask) -> Optional[str]:
    if return_debug_mask:
        return "return_debug_mask=True (fastattn returns no attention probabilities)"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return f"query/key/value are {query.dim()}/{key.dim()}/{value.dim()}-D; expected 4-D (B, H, L, E)"
    if len({query.dtype, key.dtype, value.dtype}) != 1:
        return "query, key and value have different dtypes"
    if query.shape[1] % key.shape[1] != 0:
        return f"{key.shape[1]} kv heads do not divide {query.shape[1]} query heads"
    if max(query.shape[-1], value.shape[-1]) > 256:
        return "head dim > 256"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p {dropout_p} not in [0, 1)"
    return None


def _seed_to_rng_state(seed: Optional[torch.Tensor], device) -> torch.Tensor:
    words = torch.zeros(2, dtype=torch.int64)
    if seed is not None:
        words[0] = seed.reshape(-1)[0]
    return words.to(device).view(torch.uint64)


def _rng_state_to_seed(rng_state: torch.Tensor) -> torch.Tensor:
    return rng_state.reshape(-1)[:1].view(torch.int64).cpu().clone()


def flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    """Kernel for aten::_scaled_dot_product_flash_attention: (out, lse, None, None, L, S, rng_state, offset, debug)."""
    error = _support_error(query, key, value, dropout_p, return_debug_mask)
    if error is not None:
        raise RuntimeError(f"fastattn flash-attention forward cannot serve this call: {error}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    seed = _philox.new_seed() if dropout_p > 0.0 else None
    out, lse = _ops(query.device.type)[0](query.contiguous(), key.contiguous(), value.contiguous(),
                                                      None, None, float(dropout_p), bool(is_causal), scale, seed)
    rng_state = _seed_to_rng_state(seed, query.device)
    offset = torch.zeros((), dtype=torch.int64, device=query.device).view(torch.uint64)
    debug = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, lse, None, None, query.shape[2], key.shape[2], rng_state, offset, debug


def flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                   is_causal, philox_seed, philox_offset, *, scale=None):
    """Kernel for aten::_scaled_dot_product_flash_attention_backward: (dq, dk, dv)."""
    error = _support_error(query, key, value, dropout_p, False)
    if error is None and logsumexp.dtype != torch.float32:
        error = f"logsumexp dtype {logsumexp.dtype}; expected float32"
    if error is not None:
        raise RuntimeError(f"fastattn flash-attention backward cannot serve this call: {error}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    seed = _rng_state_to_seed(philox_seed) if dropout_p > 0.0 else None
    return _ops(query.device.type)[1](
        grad_out.contiguous(), query.contiguous(), key.contiguous(), value.contiguous(), out.contiguous(),
        logsumexp.contiguous(), None, None, float(dropout_p), bool(is_causal), scale, seed)


def register(lib: torch.library.Library, device: str = "CUDA") -> None:
    """Register the two kernels into ``lib`` (an ``aten`` IMPL library) under ``device``."""
    lib.impl(FLASH_FWD, flash_forward, device)
    lib.impl(FLASH_BWD, flash_backward, device)
