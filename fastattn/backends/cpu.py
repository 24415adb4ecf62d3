"""The C++ CPU kernels (csrc/cpu/): torch.ops.fastattn.* under the CPU dispatch key."""
from __future__ import annotations

import torch

from .base import OpBackend
from .. import ops


class CPUBackend(OpBackend):
    name = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ffn_dtypes = (torch.float32, torch.bfloat16, torch.float64)
    max_head_dim = 256

    def _probe(self):
        err = ops.extension_error()
        if err is None and not (ops.has_kernel("attention_fwd", "CPU") or ops.has_kernel("ffn_fwd", "CPU")):
            err = "this build of fastattn._C carries no CPU kernels"
        return err

    def op_unavailable_reason(self, kind: str):
        op = "attention_fwd" if kind == "attention" else "ffn_fwd"
        if not ops.has_kernel(op, "CPU"):
            return f"this build of fastattn._C has no CPU kernel for fastattn::{op}"
        return None
