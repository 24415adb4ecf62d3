"""fastattn as a provider for torch's own ``torch.nn.functional.scaled_dot_product_attention``.

    with fastattn.enable_sdpa():          # or: handle = fastattn.enable_sdpa(); ...; handle.remove()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False, dropout_p=0.1)

How it hooks in. ``aten::scaled_dot_product_attention`` is a CompositeImplicitAutograd op: for CPU
tensors it picks ``aten::_scaled_dot_product_flash_attention_for_cpu`` (whose backward is
``…_for_cpu_backward``) when torch's CPU flash kernel can serve the call, and otherwise
``aten::_scaled_dot_product_attention_math`` (GQA, dropout, some masks; itself composite: matmul,
softmax, dropout). On CUDA it picks among ``_scaled_dot_product_flash_attention``,
``…_efficient_attention``, ``…_cudnn_attention`` and the math path. A kernel registered for one of
those inner ops replaces torch's kernel for every call and cannot hand a call back (the shadowed
kernel is not callable while the override stands; torch's FA4 provider raises instead), so fastattn
registers one level higher: a kernel for ``aten::scaled_dot_product_attention`` itself under the
Autograd<device> and <device> keys (CPU, and CUDA where fastattn has CUDA or Triton kernels). On CUDA
it also replaces torch's flash-attention ops as torch's FA4 provider does (fastattn/_sdpa_flash.py),
for the calls that still reach them. It
serves what fastattn's kernels serve through ``torch.ops.fastattn.attention_fwd`` (whose registered
autograd runs ``attention_bwd``) and hands every other call to torch's composite kernel unchanged
(``OpOverload.decompose``), which then picks torch's flash/math kernels exactly as without fastattn.

- Handles nest: the registration stands while any handle is alive; the innermost live handle's
  backend is used. ``remove()`` is idempotent; the last removal destroys the registration, which
  restores torch's dispatch table exactly.
- An exception raised by a fastattn kernel in the forward is reported once (a warning) and the call
  is served by torch's kernel, so SDPA never breaks while enabled.
- fastattn stands in for torch's flash backend: inside ``torch.nn.attention.sdpa_kernel(...)``
  without ``SDPBackend.FLASH_ATTENTION`` every call goes to torch's kernels.
- torch.compile(fullgraph=True) traces through the registered kernel: the graph holds
  fastattn::attention_fwd / attention_bwd. A graph keeps the kernels it was traced with: compile
  after enabling, and call ``torch._dynamo.reset()`` after removing to drop graphs holding fastattn.
- Where torch has ``torch.nn.attention.register_flash_attention_impl`` (2.13), importing fastattn
  registers "fastattn" there (never activating it): ``activate_flash_attention_impl("fastattn")``
  calls ``enable_sdpa()`` and ``restore_flash_attention_impl()`` removes that handle.
"""
from __future__ import annotations

import math
import threading
import warnings
from typing import Optional

import torch
from torch.library import Library

from . import _library as ops
from . import attention as _attention

__all__ = ["enable_sdpa", "sdpa_enabled", "SDPAHandle", "sdpa_decline_reason"]

_OP = "scaled_dot_product_attention"
_BACKENDS = (None, "cpu", "cuda", "triton")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_MAX_HEAD_DIM = 256

_lock = threading.RLock()
_handles: list["SDPAHandle"] = []
_lib: Optional[Library] = None
_lib_devices: tuple[str, ...] = ()
_warned: set[str] = set()
# Counters for tests and diagnostics: calls served by fastattn / handed to torch.
stats = {"served": 0, "fell_through": 0, "errors": 0}


class SDPAHandle:
    """Keeps fastattn registered as torch SDPA's kernel until ``remove()`` (or the ``with`` exits)."""

    def __init__(self, backend: Optional[str]):
        self.backend = backend
        self._live = True

    @property
    def active(self) -> bool:
        return self._live

    def remove(self) -> None:
        with _lock:
            if not self._live:
                return
            self._live = False
            _handles.remove(self)
            if not _handles:
                _unregister()

    def __enter__(self) -> "SDPAHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"SDPAHandle(backend={self.backend!r}, active={self._live})"


def _device_types() -> tuple[str, ...]:
    """Devices whose SDPA calls fastattn takes over: CPU, and CUDA when this machine can run a kernel."""
    devices = ["CPU"]
    if ops.has_kernel("attention_fwd", "CUDA") or _triton_importable():
        devices.append("CUDA")
    return tuple(devices)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _register() -> None:
    global _lib, _lib_devices
    lib = Library("aten", "IMPL")
    devices = _device_types()
    try:
        for dev in devices:
            lib.impl(_OP, _sdpa_kernel, "Autograd" + dev)
            lib.impl(_OP, _sdpa_kernel, dev)
        if "CUDA" in devices:  # torch's CUDA flash backend too (see fastattn/_sdpa_flash.py)
            from . import _sdpa_flash

            _sdpa_flash.register(lib, "CUDA")
    except Exception:
        lib._destroy()
        raise
    _lib, _lib_devices = lib, devices


def _unregister() -> None:
    global _lib, _lib_devices
    if _lib is not None:
        _lib._destroy()
    _lib, _lib_devices = None, ()


def enable_sdpa(backend: Optional[str] = None) -> SDPAHandle:
    """Make ``torch.nn.functional.scaled_dot_product_attention`` run fastattn's kernels.

    backend: None (CPU tensors: the C++ CPU kernels; CUDA tensors: the CUDA C++ kernels, else Triton),
    "cpu", "cuda" or "triton" (calls on other devices fall through to torch).
    Returns a handle: ``handle.remove()`` or ``with fastattn.enable_sdpa(): ...``. Handles nest; the
    innermost live one's backend is used; removing the last restores torch's own kernels exactly.
    Calls fastattn does not serve (nested tensors, tensor subclasses, head dim > 256, a mask that
    requires grad, unsupported dtypes, invalid arguments, ...) run torch's kernels unchanged.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"fastattn: argument 'backend' got {backend!r}; expected one of {list(_BACKENDS)}")
    if ops.extension_error() is not None and backend != "triton":
        raise RuntimeError(f"fastattn: enable_sdpa needs the C++ ops: {ops.extension_error()}")
    with _lock:
        if not _handles:
            _register()
        handle = SDPAHandle(backend)
        _handles.append(handle)
    return handle


def sdpa_enabled() -> bool:
    """True while some enable_sdpa() handle is alive."""
    return bool(_handles)


def _current_backend() -> Optional[str]:
    return _handles[-1].backend if _handles else None


# ---- which calls fastattn serves -------------------------------------------------------------------
def _plain(t) -> bool:
    # Dense tensors, and the fake/functional wrappers torch.compile traces with; other subclasses
    # (DTensor, nested, quantised, ...) keep torch's own handling.
    if not isinstance(t, torch.Tensor) or t.is_nested or t.layout != torch.strided:
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(t):  # torch.func transforms keep torch's kernels
        return False
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return True
    name = type(t).__name__
    return name in ("FakeTensor", "FunctionalTensor")


def _op_for(device_type: str, backend: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(which ops of fastattn.attention.FWD_OPS, None) or (None, why not) for a device and a backend."""
    if backend == "triton":
        return ("triton", None) if _triton_importable() else (None, "triton is not importable")
    if device_type == "cpu":
        if backend not in (None, "cpu"):
            return None, f"backend {backend!r} does not serve CPU tensors"
        if not ops.has_kernel("attention_fwd", "CPU"):
            return None, "this build of fastattn._C has no CPU attention kernel"
        return "cpp", None
    if device_type == "cuda":
        if backend == "cpu":
            return None, "backend 'cpu' does not serve CUDA tensors"
        if ops.has_kernel("attention_fwd", "CUDA"):
            return "cpp", None
        if backend is None and _triton_importable():
            return "triton", None
        return None, "this build of fastattn._C has no CUDA attention kernel"
    return None, f"device {device_type} is not served"


def sdpa_decline_reason(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, backend=None) -> Optional[str]:
    """None when fastattn serves this torch SDPA call, else why the call goes to torch's kernels."""
    if not torch._C._get_flash_sdp_enabled():
        return "torch's flash backend is disabled (torch.nn.attention.sdpa_kernel without FLASH_ATTENTION)"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not _plain(t):
            return f"{name} is not a plain dense tensor ({type(t).__name__})"
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return f"query/key/value are {query.dim()}-D/{key.dim()}-D/{value.dim()}-D; served: all 3-D or all 4-D"
    if len({query.device, key.device, value.device}) != 1:
        return "query, key and value are on different devices"
    if len({query.dtype, key.dtype, value.dtype}) != 1 or query.dtype not in _DTYPES:
        return f"dtypes {query.dtype}/{key.dtype}/{value.dtype}; served: one of {list(_DTYPES)}"
    _op, why = _op_for(query.device.type, backend)
    if why is not None:
        return why
    if query.dim() == 3:
        n, l, e = query.shape
        hq = hkv = 1
        s = key.shape[1]
        if key.shape[0] != n or value.shape[0] != n or value.shape[1] != s:
            return "batch or key length mismatch"
    else:
        n, hq, l, e = query.shape
        hkv, s = key.shape[1], key.shape[2]
        if key.shape[0] != n or tuple(value.shape[:3]) != (n, hkv, s):
            return "batch, head or key length mismatch"
    ev = value.shape[-1]
    if key.shape[-1] != e:
        return "key's head dim differs from query's"
    if min(n, l, s, e, ev, hq, hkv) == 0:
        return "an empty dimension"
    if max(e, ev) > _MAX_HEAD_DIM:
        return f"head dim {max(e, ev)} > {_MAX_HEAD_DIM}"
    if hkv != hq and (not enable_gqa or hq % hkv != 0):
        return f"{hkv} kv heads for {hq} query heads without a valid enable_gqa"
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        return f"dropout_p {dropout_p!r} not in [0, 1)"
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        return f"scale {scale!r} is not a finite float"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask together with is_causal (torch raises its own error)"
        if not _plain(attn_mask):
            return f"attn_mask is not a plain dense tensor ({type(attn_mask).__name__})"
        if attn_mask.device != query.device:
            return "attn_mask is on another device"
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return f"attn_mask dtype {attn_mask.dtype} is neither bool nor the query's {query.dtype}"
        if attn_mask.requires_grad:
            return "attn_mask requires grad (fastattn's kernels give no mask gradient)"
        target = (n, hq, l, s) if query.dim() == 4 else (n, l, s)
        if attn_mask.dim() > len(target):
            return f"attn_mask has {attn_mask.dim()} dims"
        try:
            if torch.broadcast_shapes(tuple(attn_mask.shape), target) != target:
                return f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {target}"
        except RuntimeError:
            return f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {target}"
    return None


# ---- the registered kernel -------------------------------------------------------------------------
def _serve(which, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    # fastattn's own validation and normalisation (the checks above only decide whether to serve)
    call = _attention.make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, None, enable_gqa)
    out, _lse = _attention.FWD_OPS[which](call.q, call.k, call.v, call.attn_mask, None, call.dropout_p,
                                          call.is_causal, call.scale, call.seed)
    return out.squeeze(1) if call.squeeze_head else out


def _fall_through(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    stats["fell_through"] += 1
    return torch.ops.aten.scaled_dot_product_attention.default.decompose(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _sdpa_kernel(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
    backend = _current_backend()
    try:
        why = sdpa_decline_reason(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                  backend)
    except Exception as exc:  # never let a bug in the check break torch's SDPA
        why = f"the check raised {type(exc).__name__}: {exc}"
    if why is not None:
        return _fall_through(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    which, _ = _op_for(query.device.type, backend)
    try:
        out = _serve(which, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    except Exception as exc:
        stats["errors"] += 1
        _warn_once(f"{type(exc).__name__}:{exc}",
                   f"fastattn: the SDPA kernel raised {type(exc).__name__}: {exc}; this call (and any like it) "
                   "runs torch's own kernel")
        return _fall_through(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    stats["served"] += 1
    return out


# ---- torch.nn.attention's registry of flash-attention providers (torch 2.13) ------------------------
def _register_with_torch() -> bool:
    """Register "fastattn" with torch.nn.attention.register_flash_attention_impl where torch has it."""
    try:
        from torch.nn import attention as _attention
    except Exception:
        return False
    register = getattr(_attention, "register_flash_attention_impl", None)
    if register is None:
        return False
    register("fastattn", register_fn=enable_sdpa)
    return True


REGISTERED_WITH_TORCH = _register_with_torch()
