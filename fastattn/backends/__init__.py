"""Backends and the dispatcher's choice among them.

A backend declares what it serves (devices, dtypes, head dims) and explains itself: its
``attention_reasons(call, forced)`` / ``ffn_reasons(call, forced)`` return the reasons it cannot
serve a call (empty = it can). The choice, in order: the call's ``backend=``, then the innermost
``fastattn.use_backend(name)``, then the environment variable FASTATTN_BACKEND, else the first of
cuda -> triton -> cpu -> reference that serves the call. A forced backend that cannot serve raises
one error listing its reasons; the automatic choice moves on. See README.md here for the contract.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .base import Backend, BackendError

PRIORITY = ("cuda", "triton", "cpu", "reference")
_REGISTRY: dict[str, Backend] = {}
_FORCED_STACK: list[str] = []  # a plain list, not a ContextVar, so torch.compile traces through it


def _registry() -> dict[str, Backend]:
    if not _REGISTRY:
        from .cpu import CPUBackend
        from .cuda import CUDABackend
        from .reference import ReferenceBackend
        from .triton import TritonBackend

        for cls in (CUDABackend, TritonBackend, CPUBackend, ReferenceBackend):
            _REGISTRY[cls.name] = cls()
    return _REGISTRY


def get_backend(name: str) -> Backend:
    reg = _registry()
    if name not in reg:
        raise ValueError(f"fastattn: backend {name!r} is unknown; expected one of {list(PRIORITY)}")
    return reg[name]


def available_backends(kind: str | None = None) -> list[str]:
    """Names of the backends usable on this machine, in priority order.

    kind: None (any op family), "attention" or "ffn" (only backends carrying those kernels)."""
    names = []
    for name in PRIORITY:
        be = get_backend(name)
        if be.unavailable_reason() is not None:
            continue
        if kind is not None and (be.op_unavailable_reason(kind) is not None
                                 or not (be.serves_attention if kind == "attention" else be.serves_ffn)):
            continue
        names.append(name)
    return names


def backend_status() -> dict[str, str | None]:
    """name -> None when available, else the reason it is not."""
    return {name: get_backend(name).unavailable_reason() for name in PRIORITY}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fastattn calls on backend ``name`` (an error if it cannot serve one)."""
    get_backend(name)  # unknown names fail here, at the ``with``
    _FORCED_STACK.append(name)
    try:
        yield
    finally:
        _FORCED_STACK.pop()


_ENV_BACKEND = os.environ.get("FASTATTN_BACKEND") or None


def _forced_name(explicit: str | None) -> tuple[str | None, str]:
    if explicit is not None:
        return explicit, "backend="
    if _FORCED_STACK:
        return _FORCED_STACK[-1], "fastattn.use_backend"
    if _ENV_BACKEND is not None:
        return _ENV_BACKEND, "FASTATTN_BACKEND"
    return None, ""


def select_backend(kind: str, call, explicit: str | None = None) -> Backend:
    """The backend that serves ``call`` (kind: "attention" or "ffn")."""
    name, source = _forced_name(explicit)
    if name is not None:
        if name not in PRIORITY:
            raise ValueError(f"fastattn: {source} got backend {name!r}; expected one of {list(PRIORITY)}")
        be = get_backend(name)
        reasons = be.reasons(kind, call, forced=True)
        if reasons:
            raise BackendError(f"fastattn: backend {name!r} (from {source}) cannot serve this {kind} call because: "
                               + "; ".join(reasons))
        return be
    tried = []
    for candidate in PRIORITY:
        be = get_backend(candidate)
        reasons = be.reasons(kind, call, forced=False)
        if not reasons:
            return be
        tried.append(f"{candidate}: " + "; ".join(reasons))
    raise BackendError(f"fastattn: no backend can serve this {kind} call: " + " | ".join(tried))


__all__ = ["Backend", "BackendError", "PRIORITY", "available_backends", "backend_status", "get_backend",
           "select_backend", "use_backend", "torch"]
