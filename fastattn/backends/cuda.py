"""The CUDA C++ kernels (csrc/cuda/): torch.ops.fastattn.* under the CUDA dispatch key."""
from __future__ import annotations

import torch

from .base import OpBackend
from .. import ops


class CUDABackend(OpBackend):
    name = "cuda"
    devices = ("cuda",)
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = 256

    def _probe(self):
        err = ops.extension_error()
        if err is not None:
            return err
        if not ops.build_info().get("with_cuda", False):
            return "fastattn._C was built without CUDA (rebuild with FORCE_CUDA=1 and a CUDA build of torch)"
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        self._capability = torch.cuda.get_device_capability()
        if self._capability < (8, 0):
            return f"compute capability {self._capability} < (8, 0) (cp.async and bf16 mma need sm_80+)"
        return None

    def attention_reasons(self, call, forced: bool) -> list[str]:
        reasons = super().attention_reasons(call, forced)
        # sm_86/sm_89 give a block 99 KB of shared memory: the dQ kernel of the 128 and 256 buckets
        # needs 104/135 KB there (sm_80 and sm_90 have 163/227 KB).
        if getattr(self, "_capability", (9, 0)) in ((8, 6), (8, 7), (8, 9)) and max(call.head_dims) > 96:
            reasons.append(f"head dim {max(call.head_dims)} > 96 needs more shared memory than sm_{''.join(map(str, self._capability))} gives a block")
        return reasons

    def op_unavailable_reason(self, kind: str):
        op = "attention_fwd" if kind == "attention" else "ffn_fwd"
        if not ops.has_kernel(op, "CUDA"):
            return f"this build of fastattn._C has no CUDA kernel for fastattn::{op}"
        return None
