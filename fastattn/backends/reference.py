"""The pure-PyTorch reference as a backend: serves every call, differentiable by plain autograd."""
from __future__ import annotations

import torch

from ..reference import attention_reference, ffn_reference
from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "meta")
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    max_head_dim = 1 << 30

    def attention_reasons(self, call, forced: bool) -> list[str]:
        return []

    def attention(self, call) -> torch.Tensor:
        # The user's own mask keeps its autograd graph (a mask that requires grad gets its gradient).
        mask = call.attn_mask
        if call.mask_requires_grad:
            um = call.user_attn_mask
            if um.dtype != torch.bool:
                um = um.to(call.dtype)
            mask = um.unsqueeze(-3) if call.squeeze_head and um.dim() == 3 else um
        return attention_reference(call.q, call.k, call.v, mask, call.key_padding_mask, call.dropout_p,
                                   call.is_causal, call.scale, call.seed)

    def feed_forward(self, call) -> torch.Tensor:
        return ffn_reference(call.x, call.w1, call.b1, call.w2, call.b2, call.activation, call.dropout_p, call.seed)
