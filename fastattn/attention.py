"""The attention op family, in one place: the public call, its validation, the op schemas, their
fake kernels and autograd, and one record per backend.

    scaled_dot_product_attention(q, k, v, ...)        # (N, H, L, E) -> (N, H, L, Ev)

A call's path: `scaled_dot_product_attention` validates and normalises once (`AttentionCall`), asks
fastattn/backends for the record of the backend that serves it, and that record calls its kernel:
`torch.ops.fastattn.attention_fwd` (C++: csrc/cpu/ for CPU tensors, csrc/cuda/ for CUDA tensors, the
dispatcher picks by device), `torch.ops.fastattn.triton_attention_fwd` (kernels/attention.py), or the
pure-PyTorch reference (fastattn/reference.py). Every error names the argument, what it got and what
was expected. Inputs are never modified.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _library, _philox, backends
from .backends import Impl
from .reference import attention_reference

# ---- op schemas (written once; the C++ extension and the Triton launchers implement them) ----------
# q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev) contiguous (the C++ CPU op: any views whose last dim
# is contiguous; a non-contiguous q gets out laid out (N, L, Hq, Ev)), Hq % Hkv == 0; attn_mask additive,
# an expanded (N, Hq, L, S) view (strides may be 0); key_padding_mask bool (N, S), True = ignore;
# seed int64 CPU (1,) when dropout_p > 0. -> out (N, Hq, L, Ev) in q's dtype, lse (N, Hq, L) float32
# (+inf on a row that sees no key). The backward -> dq, dk, dv shaped like q, k, v.
FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, "
              "bool is_causal, float scale, Tensor? seed) -> (Tensor, Tensor)")
BWD_SCHEMA = ("(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
              "Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, Tensor? seed) "
              "-> (Tensor, Tensor, Tensor)")


def _triton_backward(*args):
    from .kernels import attention as kernels
    from .kernels import attention_sm90_bwd  # sm_90: serves what its table covers (FASTATTN_TRITON_ATTN)
    from .kernels import attention_small  # small problems first, as in the forward (FASTATTN_TRITON_SMALL)

    grads = attention_small.backward(*args)
    if grads is None:
        grads = attention_sm90_bwd.backward(*args)
    return grads if grads is not None else kernels.attention_backward(*args)


def _triton_kernels():
    from .kernels import attention as kernels  # imported at first use: `import fastattn` never imports triton

    return kernels.attention_forward, _triton_backward


def _fwd_fake(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
    n, hq, l, _ = q.shape
    ev = v.shape[-1]
    # as the C++ CPU op: a non-contiguous q (rows viewed from a packed projection) gets its out laid
    # out (N, L, Hq, Ev); the other backends take contiguous tensors only
    out = q.new_empty(n, hq, l, ev) if q.is_contiguous() else q.new_empty(n, l, hq, ev).transpose(1, 2)
    return out, q.new_empty(n, hq, l, dtype=torch.float32)


def _bwd_fake(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # contiguous, whatever q's strides


def _autograd(bwd_op):
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, kpm, dropout_p, is_causal, scale, seed = inputs
        ctx.save_for_backward(q, k, v, output[0], output[1], attn_mask, kpm, seed)
        ctx.meta = (dropout_p, is_causal, scale)

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, attn_mask, kpm, seed = ctx.saved_tensors
        dropout_p, is_causal, scale = ctx.meta
        dq, dk, dv = bwd_op(grad_out.contiguous(), q, k, v, out, lse, attn_mask, kpm, dropout_p, is_causal,
                            scale, seed)
        return dq, dk, dv, None, None, None, None, None, None

    return setup_context, backward


# attention_fwd/_bwd: C++ kernels per device, their autograd in C++ (csrc/autograd.cpp: no Python on the
# call path); triton_attention_fwd/_bwd: the launchers above, their autograd from _autograd.
FWD_OPS, BWD_OPS = _library.define_family("attention", FWD_SCHEMA, BWD_SCHEMA, _triton_kernels,
                                          _fwd_fake, _bwd_fake, _autograd)


# ---- the validated call ------------------------------------------------------------------------------
_fail, _describe = _library.fail, _library.describe


def _check_tensor(name: str, t, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, type(t).__name__, "a torch.Tensor")
    if t.is_nested:
        _fail(name, "a NestedTensor", "a dense tensor (pad the batch and pass key_padding_mask)")
    if floating and not t.dtype.is_floating_point:
        _fail(name, _describe(t), "a floating-point tensor (float16, bfloat16, float32 or float64)")


def mask_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an additive attn_mask reaches the kernels in, for queries of `dtype`: float32 (float64
    for float64), added at the accumulation precision, never rounded to a 16-bit dtype first."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class AttentionCall:
    """A validated, normalised attention call: what every backend receives.

    q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev), contiguous. attn_mask: None or additive
    (`mask_dtype(q.dtype)`), an expanded (N, Hq, L, S) view. key_padding_mask: None or bool (N, S),
    True = ignore. seed: int64 CPU (1,) when dropout_p > 0."""

    __slots__ = ("q", "k", "v", "attn_mask", "key_padding_mask", "dropout_p", "is_causal", "scale", "seed",
                 "user_attn_mask", "squeeze_head", "choice")

    def __init__(self, q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, user_attn_mask,
                 squeeze_head, choice=None):
        self.q, self.k, self.v = q, k, v
        self.attn_mask, self.key_padding_mask = attn_mask, key_padding_mask
        self.dropout_p, self.is_causal, self.scale, self.seed = dropout_p, is_causal, scale, seed
        self.user_attn_mask = user_attn_mask  # as given: the reference keeps its autograd graph
        self.squeeze_head = squeeze_head  # the user passed 3-D (B, L, E) tensors
        # what the backend choice depends on: (device type, dtype, E, Ev, mask requires grad)
        self.choice = choice if choice is not None else (q.device.type, q.dtype, q.shape[-1], v.shape[-1],
                                                         user_attn_mask is not None and user_attn_mask.requires_grad)

    @property
    def mask_requires_grad(self) -> bool:
        return self.user_attn_mask is not None and self.user_attn_mask.requires_grad


def _normalise_mask(attn_mask, dtype, device, target: tuple, squeeze_head: bool) -> torch.Tensor:
    """User mask (bool keep / float add, broadcastable) -> additive, expanded (N, Hq, L, S)."""
    _check_tensor("attn_mask", attn_mask, floating=False)
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        _fail("attn_mask", _describe(attn_mask), "a bool (True = keep) or floating (added to scores) tensor")
    if attn_mask.device != device:
        _fail("attn_mask", f"device {attn_mask.device}", f"the query's device {device}")
    user_shape = target if not squeeze_head else (target[0], target[2], target[3])
    try:
        ok = attn_mask.dim() <= len(user_shape) and \
            torch.broadcast_shapes(tuple(attn_mask.shape), user_shape) == tuple(user_shape)
    except RuntimeError:
        ok = False
    if not ok:
        _fail("attn_mask", f"shape {tuple(attn_mask.shape)}", f"a shape broadcastable to {tuple(user_shape)}")
    mdt = mask_dtype(dtype)
    if attn_mask.dtype == torch.bool:
        add = torch.zeros(attn_mask.shape, dtype=mdt, device=device).masked_fill(~attn_mask, float("-inf"))
    else:
        add = attn_mask.to(mdt)
    if squeeze_head:  # (…, L, S) of a 3-D call -> (B?, 1, L, S)
        add = add.reshape((1,) * (3 - add.dim()) + tuple(add.shape)).unsqueeze(1)
    else:
        add = add.reshape((1,) * (4 - add.dim()) + tuple(add.shape))
    return add.expand(*target)


def make_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              key_padding_mask=None, enable_gqa=False) -> AttentionCall:
    """Validate a call (clear errors naming the argument) and normalise it for the kernels."""
    # One combined test for the common, valid call; the detailed checks run only when it fails (or
    # for a subclass), so a valid call pays ~1 µs here and a bad one still gets its precise error.
    T = torch.Tensor
    fast = type(query) is T and type(key) is T and type(value) is T
    if fast:
        dtype, device, qdim = query.dtype, query.device, query.dim()
        fast = (dtype.is_floating_point and key.dtype is dtype and value.dtype is dtype and (qdim == 4 or qdim == 3)
                and key.dim() == qdim and value.dim() == qdim and key.device == device and value.device == device
                and not (query.is_nested or key.is_nested or value.is_nested))
    if not fast:
        _check_tensor("query", query)
        _check_tensor("key", key)
        _check_tensor("value", value)
        qdim = query.dim()
        if qdim != 4 and qdim != 3:
            _fail("query", _describe(query), "a 4-D (N, H, L, E) or 3-D (B, L, E) tensor")
        dtype, device = query.dtype, query.device
        for name, t in (("key", key), ("value", value)):
            if t.dim() != qdim:
                _fail(name, _describe(t), f"a {qdim}-D tensor like query")
            if t.dtype != dtype:
                _fail(name, f"dtype {t.dtype}", f"query's dtype {dtype}")
            if t.device != device:
                _fail(name, f"device {t.device}", f"query's device {device}")
    squeeze_head = qdim == 3
    if squeeze_head:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    n, hq, l, e = query.shape
    nk, hkv, s, ek = key.shape
    nv, hv, sv, ev = value.shape
    if nk != n or nv != n:
        _fail("key" if nk != n else "value", f"batch size {nk if nk != n else nv}", f"query's batch size {n}")
    if ek != e:
        _fail("key", f"head dim {ek}", f"query's head dim {e}")
    if hv != hkv or sv != s:
        _fail("value", f"shape {tuple(value.shape)}", f"the same heads and sequence length as key {tuple(key.shape)}")
    if hkv != hq:
        if not enable_gqa:
            _fail("key", f"{hkv} heads", f"query's {hq} heads (or pass enable_gqa=True for grouped-query attention)")
        if hq % hkv != 0:
            _fail("key", f"{hkv} heads", f"a divisor of query's {hq} heads for grouped-query attention")
    if l == 0:
        _fail("query", "sequence length 0", "a sequence length >= 1")
    if s == 0:
        _fail("key", "sequence length 0", "a sequence length >= 1")
    if e == 0 or ev == 0:
        _fail("query" if e == 0 else "value", "head dim 0", "a head dim >= 1")
    if dropout_p.__class__ is not float or not 0.0 <= dropout_p < 1.0:
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
            _fail("dropout_p", repr(dropout_p), "a float in [0, 1)")
        dropout_p = float(dropout_p)
    if is_causal is not True and is_causal is not False:
        _fail("is_causal", repr(is_causal), "a bool")
    if scale is None:
        scale = 1.0 / math.sqrt(e)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail("scale", repr(scale), "None or a finite float")
    else:
        scale = float(scale)
    mask = None
    if attn_mask is not None:
        mask = _normalise_mask(attn_mask, dtype, device, (n, hq, l, s), squeeze_head)
    kpm = key_padding_mask
    if kpm is not None:
        _check_tensor("key_padding_mask", kpm, floating=False)
        if kpm.dtype != torch.bool:
            _fail("key_padding_mask", _describe(kpm), "a bool tensor (True = ignore that key)")
        if tuple(kpm.shape) != (n, s):
            _fail("key_padding_mask", f"shape {tuple(kpm.shape)}", f"(batch, key length) = {(n, s)}")
        if kpm.device != device:
            _fail("key_padding_mask", f"device {kpm.device}", f"the query's device {device}")
        kpm = kpm.contiguous()
    seed = _philox.new_seed(device, n * hq * l * s) if dropout_p > 0.0 else None
    choice = (device.type, dtype, e, ev, attn_mask is not None and attn_mask.requires_grad)
    return AttentionCall(query.contiguous(), key.contiguous(), value.contiguous(), mask, kpm, dropout_p, is_causal,
                         scale, seed, attn_mask, squeeze_head, choice)


# ---- one record per backend ----------------------------------------------------------------------------
def _kernel_reasons(max_head_dim: int):
    def reasons(info, forced):
        _device, _dtype, e, ev, mask_requires_grad = info
        out = []
        if max(e, ev) > max_head_dim:
            out.append(f"head dim {max(e, ev)} > {max_head_dim}")
        if mask_requires_grad:
            out.append("attn_mask requires grad (kernels give no mask gradient; the reference does)")
        return out

    return reasons


def _cuda_reasons(info, forced):
    out = _kernel_reasons(256)(info, forced)
    # sm_86/sm_89 give a block 99 KB of shared memory: the dQ kernel of the 128 and 256 head-dim
    # buckets needs 104/135 KB there (sm_80 and sm_90 have 163/227 KB).
    cap = backends.cuda_capability()
    if cap in ((8, 6), (8, 7), (8, 9)) and max(info[2], info[3]) > 96:
        out.append(f"head dim {max(info[2], info[3])} > 96 needs more shared memory than sm_{cap[0]}{cap[1]} "
                   "gives a block")
    return out


def _op_runner(fwd):
    def run(call: AttentionCall) -> torch.Tensor:
        return fwd(call.q, call.k, call.v, call.attn_mask, call.key_padding_mask, call.dropout_p, call.is_causal,
                   call.scale, call.seed)[0]

    return run


def _run_reference(call: AttentionCall) -> torch.Tensor:
    mask = call.attn_mask
    if call.mask_requires_grad:  # the user's own mask keeps its autograd graph
        um = call.user_attn_mask
        if um.dtype != torch.bool:
            um = um.to(call.q.dtype)
        mask = um.unsqueeze(-3) if call.squeeze_head and um.dim() == 3 else um
    return attention_reference(call.q, call.k, call.v, mask, call.key_padding_mask, call.dropout_p, call.is_causal,
                               call.scale, call.seed)


_F16, _BF16, _F32, _F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
IMPLS: dict[str, Impl] = {
    "cuda": Impl("cuda", ("cuda",), (_F16, _BF16, _F32), _op_runner(FWD_OPS["cpp"]), _cuda_reasons,
                 kernel=("attention_fwd", "CUDA")),
    "triton": Impl("triton", ("cuda", "cpu") if backends.interpreter_on() else ("cuda",), (_F16, _BF16, _F32),
                   _op_runner(FWD_OPS["triton"]), _kernel_reasons(256), forced_only_devices=("cpu",)),
    "cpu": Impl("cpu", ("cpu",), (_F32, _BF16, _F16, _F64), _op_runner(FWD_OPS["cpp"]), _kernel_reasons(256),
                kernel=("attention_fwd", "CPU")),
    "reference": Impl("reference", ("cpu", "cuda", "meta"), (_F16, _BF16, _F32, _F64), _run_reference),
}
backends.register_family("attention", IMPLS)


def chosen_backend(call: AttentionCall, backend: Optional[str] = None) -> str:
    """The name of the backend that serves `call` (explicit, use_backend, env, or automatic)."""
    return backends.choose("attention", *call.choice, backend).backend


# ---- the public function ---------------------------------------------------------------------------------
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, *, key_padding_mask=None, enable_gqa=False, backend=None):
    """Fused scaled-dot-product attention with torch.nn.functional.scaled_dot_product_attention's meaning.

    query: (N, H, L, E) or (B, L, E); key: (N, Hkv, S, E); value: (N, Hkv, S, Ev) (3-D alike).
    attn_mask: bool (True = keep) or float (added to the scores), broadcastable to (N, H, L, S).
    key_padding_mask: bool (N, S), True = that key is ignored (as in nn.MultiheadAttention).
    is_causal: top-left causal mask (query i sees keys j <= i). scale: default 1/sqrt(E).
    enable_gqa: allow Hkv dividing H (grouped-query attention). dropout_p: on the probabilities,
    seeded from torch's generator. A query row whose every key is masked returns 0 (and 0 gradient).
    backend: None (automatic: cuda -> triton -> cpu -> reference) or one of those names.
    Returns (N, H, L, Ev) (or (B, L, Ev)) in query's dtype.
    """
    T = torch.Tensor
    # The common call -- plain 4-D tensors, no mask, no dropout, the automatic choice landing on a C++
    # backend -- goes straight to the op, whose own checks (csrc/checks.h) refuse what it cannot
    # take; a refusal re-runs the call through the full validation below, which raises its precise error.
    if (attn_mask is None and key_padding_mask is None and (backend is None or backend.__class__ is str)
            and not torch.compiler.is_compiling() and dropout_p.__class__ is float and dropout_p == 0.0
            and (is_causal is False or is_causal is True) and (scale is None or scale.__class__ is float)
            and type(query) is T and type(key) is T and type(value) is T
            and not (query.is_nested or key.is_nested or value.is_nested)):
        qs, ks, vs = query.shape, key.shape, value.shape
        # contiguous tensors, or on the CPU any views whose last dim is contiguous (the C++ CPU op reads
        # them in place: heads viewed in a projection's rows, a slice of a longer KV cache)
        if (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and qs[2] and ks[2] and qs[3] and (qs[1] == ks[1] or enable_gqa is True)
                and ((query.is_contiguous() and key.is_contiguous() and value.is_contiguous())
                     or (query.is_cpu and query.stride(3) == 1 and key.stride(3) == 1 and value.stride(3) == 1))):
            op = _direct_op(query, qs[3], vs[3], backend)
            if op is not None and (scale is None or math.isfinite(scale)):
                try:
                    return op(query, key, value, None, None, 0.0, is_causal,
                              1.0 / math.sqrt(qs[3]) if scale is None else scale, None)[0]
                except (ValueError, RuntimeError):  # RuntimeError: no kernel for a mix of devices
                    pass  # the op's check refused it: the full validation below names the argument
    call = make_call(query, key, value, attn_mask, dropout_p, is_causal, scale, key_padding_mask, enable_gqa)
    out = backends.choose("attention", *call.choice, backend).run(call)
    return out.squeeze(1) if call.squeeze_head else out


_DIRECT: dict = {}  # (device type, dtype, E, Ev, backend, use_backend's, env's) -> the C++ forward op, or False


def _direct_op(query: torch.Tensor, e: int, ev: int, backend: Optional[str]):
    """The C++ forward op (the raw callable) when the choice for a mask-free call on query's device and
    dtype with head dims e, ev (backend, else use_backend, else FASTATTN_BACKEND, else automatic) is a
    C++ backend ("cpu" or "cuda"); None otherwise (the full path then serves the call or names the error)."""
    device_type = "cpu" if query.is_cpu else "cuda" if query.is_cuda else None
    forced = backends._FORCED_STACK[-1] if backends._FORCED_STACK else None
    key = (device_type, query.dtype, e, ev, backend, forced, backends._ENV_BACKEND)
    hit = _DIRECT.get(key)
    if hit is None:
        hit = False
        if device_type is not None:
            try:
                impl = backends.choose("attention", device_type, query.dtype, e, ev, False, backend)
            except (backends.BackendError, ValueError):
                impl = None
            if impl is not None and impl.kernel is not None:
                hit = FWD_OPS["cpp"]._op  # the OpOverload's own callable: one Python frame less per call
        _DIRECT[key] = hit
    return hit or None
