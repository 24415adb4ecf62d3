"""fastattn: fused attention and feed-forward kernels (Triton, CUDA C++, C++ CPU) for PyTorch.

    fastattn.scaled_dot_product_attention(q, k, v, ...)   # (N, H, L, E) -> (N, H, L, Ev)
    fastattn.feed_forward(x, w1, b1, w2, b2, "relu")       # (..., D) -> (..., D2)
    fastattn.MultiheadAttention / TransformerEncoderLayer  # drop-ins for torch.nn's
    fastattn.convert(model)                                # swap them into an existing model
    fastattn.enable_sdpa()                                 # torch's own F.scaled_dot_product_attention
                                                           # runs fastattn (handle / context manager)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .attention import scaled_dot_product_attention  # noqa: E402  (defines and registers the attention ops)
from .feed_forward import feed_forward  # noqa: E402  (the feed-forward ops; the name is the function)
from .backends import BackendError, available_backends, backend_status, use_backend  # noqa: E402
from .sdpa import enable_sdpa  # noqa: E402  (also registers "fastattn" with torch.nn.attention, never activates it)

_LAZY = {"MultiheadAttention": "modules", "TransformerEncoderLayer": "modules", "convert": "modules",
         "models": None, "reference": None, "modules": None}


def __getattr__(name: str):
    # The modules and models load on first use, so `import fastattn` stays light.
    if name in _LAZY:
        import importlib

        sub = _LAZY[name]
        mod = importlib.import_module(f"fastattn.{sub or name}")
        return getattr(mod, name) if sub else mod
    raise AttributeError(f"module 'fastattn' has no attribute {name!r}")


__all__ = ["scaled_dot_product_attention", "feed_forward", "available_backends", "backend_status",
           "use_backend", "BackendError", "enable_sdpa", "MultiheadAttention", "TransformerEncoderLayer", "convert",
           "models", "__version__"]
