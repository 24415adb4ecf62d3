"""The Backend base class: capabilities declared as data, reasons computed from them."""
from __future__ import annotations

import torch


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or no backend can."""


_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


class Backend:
    name = ""
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()  # attention's; ffn_dtypes when the feed-forward differs
    ffn_dtypes: tuple[torch.dtype, ...] | None = None
    max_head_dim = 256
    serves_attention = True
    serves_ffn = True

    def __init__(self):
        self._unavailable: str | None | bool = False  # False = not yet computed

    # -- availability ---------------------------------------------------------------------------
    def _probe(self) -> str | None:
        """None when usable on this machine, else why not. Computed once."""
        return None

    def unavailable_reason(self) -> str | None:
        if self._unavailable is False:
            self._unavailable = self._probe()
        return self._unavailable

    def op_unavailable_reason(self, kind: str) -> str | None:
        """Per op family (a build may carry attention kernels and not ffn ones)."""
        return None

    # -- capabilities -----------------------------------------------------------------------------
    def dtypes_for(self, kind: str) -> tuple[torch.dtype, ...]:
        """The dtypes this backend serves for "attention" or "ffn"."""
        return self.dtypes if kind == "attention" or self.ffn_dtypes is None else self.ffn_dtypes

    def _common_reasons(self, kind: str, call, forced: bool) -> list[str]:
        why = self.unavailable_reason()
        if why is not None:
            return [f"not available ({why})"]
        if not (self.serves_attention if kind == "attention" else self.serves_ffn):
            return [f"has no {kind} kernels"]
        why = self.op_unavailable_reason(kind)
        if why is not None:
            return [why]
        reasons = []
        if call.device_type not in self.devices:
            reasons.append(f"device {call.device_type} not in {list(self.devices)}")
        dtypes = self.dtypes_for(kind)
        if call.dtype not in dtypes:
            reasons.append(f"dtype {call.dtype} not in {[_DTYPE_NAMES.get(d, str(d)) for d in dtypes]}")
        return reasons

    def attention_reasons(self, call, forced: bool) -> list[str]:
        reasons = []
        e, ev = call.head_dims
        if max(e, ev) > self.max_head_dim:
            reasons.append(f"head dim {max(e, ev)} > {self.max_head_dim}")
        if call.mask_requires_grad:
            reasons.append("attn_mask requires grad (kernels give no mask gradient; the reference does)")
        return reasons

    def ffn_reasons(self, call, forced: bool) -> list[str]:
        return []

    def reasons(self, kind: str, call, forced: bool) -> list[str]:
        reasons = self._common_reasons(kind, call, forced)
        if reasons:
            return reasons
        if kind == "attention":
            return self.attention_reasons(call, forced)
        return self.ffn_reasons(call, forced)

    # -- execution ----------------------------------------------------------------------------------
    def attention(self, call) -> torch.Tensor:
        raise NotImplementedError

    def feed_forward(self, call) -> torch.Tensor:
        raise NotImplementedError


class OpBackend(Backend):
    """A backend whose kernels are the registered ops fastattn::{prefix}attention_fwd etc."""

    op_prefix = ""

    def _op(self, name: str):
        return getattr(torch.ops.fastattn, self.op_prefix + name)

    def attention(self, call) -> torch.Tensor:
        out, _lse = self._op("attention_fwd")(call.q, call.k, call.v, call.attn_mask, call.key_padding_mask,
                                              call.dropout_p, call.is_causal, call.scale, call.seed)
        return out

    def feed_forward(self, call) -> torch.Tensor:
        out, _saved = self._op("ffn_fwd")(call.x, call.w1, call.b1, call.w2, call.b2, call.activation,
                                          call.dropout_p, call.seed, call.requires_grad)
        return out
