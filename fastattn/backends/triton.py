"""The Triton kernels (kernels/ -> fastattn.kernels): torch.ops.fastattn.triton_*.

On a CUDA machine they serve CUDA tensors. Without a GPU they run only under the Triton
interpreter (TRITON_INTERPRET=1), on CPU tensors, and only when asked for by name: the interpreter
is a proof tool, far slower than the C++ CPU kernels, so the automatic choice never picks it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .base import OpBackend


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(OpBackend):
    name = "triton"
    op_prefix = "triton_"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = 256

    def __init__(self):
        super().__init__()
        self.devices = ("cuda", "cpu") if interpreter_on() else ("cuda",)

    def _probe(self):
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not interpreter_on() and not torch.cuda.is_available():
            return "no CUDA device, and TRITON_INTERPRET=1 is not set"
        return None

    def _device_reasons(self, call, forced: bool) -> list[str]:
        if call.device_type == "cpu" and not forced:
            return ["CPU tensors run under the Triton interpreter only when backend='triton' is asked for"]
        return []

    def attention_reasons(self, call, forced: bool) -> list[str]:
        return self._device_reasons(call, forced) + super().attention_reasons(call, forced)

    def ffn_reasons(self, call, forced: bool) -> list[str]:
        return self._device_reasons(call, forced) + super().ffn_reasons(call, forced)
