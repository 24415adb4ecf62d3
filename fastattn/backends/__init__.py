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
from typing import Iterator, NamedTuple

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


class CallInfo(NamedTuple):
    """What backend choice depends on: plain values, so the choice is a constant under torch.compile."""

    kind: str  # "attention" or "ffn"
    device_type: str
    dtype: torch.dtype
    head_dims: tuple[int, int]  # (E, Ev) for attention, (0, 0) for ffn
    mask_requires_grad: bool


@torch.compiler.assume_constant_result
def _choose(kind: str, device_type: str, dtype: torch.dtype, e: int, ev: int, mask_requires_grad: bool,
            name: str | None, source: str) -> str:
    # Runs eagerly even while torch.compile traces a model: dynamo bakes the chosen name into the graph
    # (and re-traces if the call's shape class changes), so dispatch costs nothing at run time.
    # Plain arguments, not a CallInfo: dynamo passes constants through, not named tuples.
    info = CallInfo(kind, device_type, dtype, (e, ev), mask_requires_grad)
    if name is not None:
        if name not in PRIORITY:
            raise ValueError(f"fastattn: {source} got backend {name!r}; expected one of {list(PRIORITY)}")
        reasons = get_backend(name).reasons(info.kind, info, forced=True)
        if reasons:
            raise BackendError(f"fastattn: backend {name!r} (from {source}) cannot serve this {info.kind} call "
                               "because: " + "; ".join(reasons))
        return name
    tried = []
    for candidate in PRIORITY:
        reasons = get_backend(candidate).reasons(info.kind, info, forced=False)
        if not reasons:
            return candidate
        tried.append(f"{candidate}: " + "; ".join(reasons))
    raise BackendError(f"fastattn: no backend can serve this {info.kind} call: " + " | ".join(tried))


def select_backend(kind: str, call, explicit: str | None = None) -> Backend:
    """The backend that serves ``call`` (kind: "attention" or "ffn")."""
    name, source = _forced_name(explicit)
    e, ev = getattr(call, "head_dims", (0, 0))
    return get_backend(_choose(kind, call.device.type, call.dtype, int(e), int(ev),
                               bool(getattr(call, "mask_requires_grad", False)), name, source))


__all__ = ["Backend", "BackendError", "PRIORITY", "available_backends", "backend_status", "get_backend",
           "select_backend", "use_backend"]
