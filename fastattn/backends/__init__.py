"""Which backends this machine has, and the choice of one for a call.

A backend is a name ("cuda", "triton", "cpu", "reference"). Whether it exists here is a probe,
computed once (`unavailable_reason`). What it serves is declared by each op family: fastattn/attention.py
and fastattn/feed_forward.py hold one `Impl` record per backend (devices, dtypes, head dims, the
kernel it calls) and register them here. The choice, in order: the call's `backend=`, then the
innermost `fastattn.use_backend(name)`, then the environment variable FASTATTN_BACKEND (read once, at
import), else the first of cuda -> triton -> cpu -> reference that serves the call. A forced backend
that cannot serve raises one error listing its reasons; the automatic choice moves on.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .. import _library

PRIORITY = ("cuda", "triton", "cpu", "reference")
_ENV_BACKEND = os.environ.get("FASTATTN_BACKEND") or None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_FORCED_STACK: list[str] = []  # a plain list, not a ContextVar, so torch.compile traces through it


class BackendError(RuntimeError):
    """A forced backend cannot serve a call, or no backend can."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one op family: what it serves and the function that runs it.

    run(call) -> output tensor; reasons(info, forced) -> family-specific reasons it cannot serve,
    where info = (device_type, dtype, E, Ev, mask_requires_grad) (E = Ev = 0 for the feed-forward).
    kernel: (op, dispatch key) that this build of fastattn._C must carry, or None."""

    backend: str
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    run: Callable
    reasons: Optional[Callable] = None
    kernel: Optional[tuple[str, str]] = None
    forced_only_devices: tuple[str, ...] = ()  # served only when this backend is asked for by name


# ---- availability probes (each computed once) ---------------------------------------------------
def interpreter_on() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors (a proof tool, slow)."""
    return _INTERPRET


def _probe_cpu() -> Optional[str]:
    return _library.extension_error()


def _probe_cuda() -> Optional[str]:
    err = _library.extension_error()
    if err is not None:
        return err
    if not _library.build_info().get("with_cuda", False):
        return "fastattn._C was built without CUDA (rebuild with FORCE_CUDA=1 and a CUDA build of torch)"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 0):
        return f"compute capability {cap} < (8, 0) (cp.async and bf16 mma need sm_80+)"
    return None


def _probe_triton() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not _INTERPRET and not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    return None


_PROBES = {"cuda": _probe_cuda, "triton": _probe_triton, "cpu": _probe_cpu, "reference": lambda: None}
_STATUS: dict[str, Optional[str]] = {}


def unavailable_reason(name: str) -> Optional[str]:
    """None when backend `name` is usable on this machine, else why not."""
    if name not in _STATUS:
        _STATUS[name] = _PROBES[_check_name(name, "backend")]()
    return _STATUS[name]


def cuda_capability() -> tuple[int, int]:
    """The current CUDA device's compute capability (only asked once CUDA is known to be there)."""
    return torch.cuda.get_device_capability()


def _check_name(name, source: str) -> str:
    if name not in PRIORITY:
        raise ValueError(f"fastattn: argument '{source}' got unknown backend {name!r}; expected one of {list(PRIORITY)}")
    return name


# ---- the op families' records -------------------------------------------------------------------
_FAMILIES: dict[str, dict[str, Impl]] = {}


def register_family(family: str, impls: dict[str, Impl]) -> None:
    """Called once by fastattn/attention.py ("attention") and fastattn/feed_forward.py ("ffn")."""
    _FAMILIES[family] = impls


def _kernel_missing(impl: Impl) -> Optional[str]:
    if impl.kernel is not None and not _library.has_kernel(*impl.kernel):
        op, key = impl.kernel
        return f"this build of fastattn._C has no {key} kernel for fastattn::{op}"
    return None


def _reasons(impl: Optional[Impl], family: str, info: tuple, forced: bool) -> list[str]:
    if impl is None:
        return [f"has no {family} kernels"]
    why = unavailable_reason(impl.backend) or _kernel_missing(impl)
    if why is not None:
        return [f"not available ({why})"]
    device_type, dtype = info[0], info[1]
    reasons = []
    if device_type not in impl.devices:
        reasons.append(f"device {device_type} not in {list(impl.devices)}")
    elif device_type in impl.forced_only_devices and not forced:
        reasons.append(f"{device_type} tensors run on {impl.backend} only when backend='{impl.backend}' is asked for")
    if dtype not in impl.dtypes:
        reasons.append(f"dtype {str(dtype).replace('torch.', '')} not in "
                       f"{[str(d).replace('torch.', '') for d in impl.dtypes]}")
    if not reasons and impl.reasons is not None:
        reasons = impl.reasons(info, forced)
    return reasons


_CHOICES: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def _choose(family: str, device_type: str, dtype: torch.dtype, e: int, ev: int, mask_requires_grad: bool,
            name: Optional[str], source: str) -> str:
    # Runs eagerly even while torch.compile traces a model: dynamo bakes the chosen name into the graph,
    # so dispatch costs nothing at run time. Plain arguments: dynamo passes constants through.
    key = (family, device_type, dtype, e, ev, mask_requires_grad, name, source)
    hit = _CHOICES.get(key)
    if hit is not None:
        return hit
    impls = _FAMILIES[family]
    info = (device_type, dtype, e, ev, mask_requires_grad)
    if name is not None:
        reasons = _reasons(impls.get(_check_name(name, source)), family, info, forced=True)
        if reasons:
            raise BackendError(f"fastattn: backend {name!r} (from {source}) cannot serve this {family} call "
                               "because: " + "; ".join(reasons))
        chosen = name
    else:
        tried = []
        for candidate in PRIORITY:
            reasons = _reasons(impls.get(candidate), family, info, forced=False)
            if not reasons:
                break
            tried.append(f"{candidate}: " + "; ".join(reasons))
        else:
            raise BackendError(f"fastattn: no backend can serve this {family} call: " + " | ".join(tried))
        chosen = candidate
    _CHOICES[key] = chosen
    return chosen


def choose(family: str, device_type: str, dtype: torch.dtype, e: int = 0, ev: int = 0,
           mask_requires_grad: bool = False, explicit: Optional[str] = None) -> Impl:
    """The record of the backend that serves this call of `family` ("attention" or "ffn")."""
    if explicit is not None:
        name, source = explicit, "backend"
    elif _FORCED_STACK:
        name, source = _FORCED_STACK[-1], "fastattn.use_backend"
    else:
        name, source = _ENV_BACKEND, "FASTATTN_BACKEND"
    return _FAMILIES[family][_choose(family, device_type, dtype, e, ev, mask_requires_grad, name, source)]


# ---- public ---------------------------------------------------------------------------------------
def available_backends(kind: Optional[str] = None) -> list[str]:
    """Names of the backends usable on this machine, in priority order.

    kind: None (any op family), "attention" or "ffn" (only backends carrying that family's kernels)."""
    if kind is not None and kind not in _FAMILIES:
        raise ValueError(f"fastattn: argument 'kind' got {kind!r}; expected None, 'attention' or 'ffn'")
    names = []
    for name in PRIORITY:
        if unavailable_reason(name) is not None:
            continue
        families = [_FAMILIES[kind]] if kind is not None else list(_FAMILIES.values())
        if any(name in impls and _kernel_missing(impls[name]) is None for impls in families):
            names.append(name)
    return names


def backend_status() -> dict[str, Optional[str]]:
    """name -> None when available, else the reason it is not."""
    return {name: unavailable_reason(name) for name in PRIORITY}


def family_impls(kind: str) -> dict[str, Impl]:
    """The records of one op family ("attention" or "ffn"): backend name -> Impl."""
    return _FAMILIES[kind]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed fastattn calls on backend `name` (an error if it cannot serve one)."""
    _check_name(name, "name")
    _FORCED_STACK.append(name)
    try:
        yield
    finally:
        _FORCED_STACK.pop()


__all__ = ["BackendError", "Impl", "PRIORITY", "available_backends", "backend_status", "choose",
           "family_impls", "interpreter_on", "register_family", "unavailable_reason", "use_backend"]
