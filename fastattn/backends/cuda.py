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
        return None

    def op_unavailable_reason(self, kind: str):
        op = "attention_fwd" if kind == "attention" else "ffn_fwd"
        if not ops.has_kernel(op, "CUDA"):
            return f"this build of fastattn._C has no CUDA kernel for fastattn::{op}"
        return None
