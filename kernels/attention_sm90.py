"""Attention forward for sm_90 (H100/H200): head dim as a compile-time constant, TMA tiles, 128-key blocks.

What it serves (everything else goes to kernels/attention.py's kernels, "classic"):
  fp16/bf16, no attn_mask, no key_padding_mask, no dropout, E == Ev == a head-dim bucket
  (32, 64, 128, 256), S >= 1, scale > 0, on a CUDA device of compute capability 9.x; causal (top-left) or not; GQA.
  The contract is fastattn/backends/README.md's: out (N, Hq, L, Ev) in q's dtype, lse (N, Hq, L)
  float32 natural log (these cases have no fully masked row: causal row i always sees key 0).

Selection: FASTATTN_TRITON_ATTN, read once at import: "sm90" (default: this kernel where it serves)
or "classic" (always the kernels of kernels/attention.py), so one process can compare both by
calling `forward(..., mode=...)` or `use_mode(...)`. kernels/attention.py's attention_forward calls
`forward` first and runs its own kernels when it returns None.

Design:
  * BLOCK_D is the head dim itself (tl.constexpr, E == the bucket): the row stride is a constant and
    there is no head-dim mask anywhere. E < bucket (e.g. 80 in the 128 bucket) stays with the classic
    kernels: a head-dim-masked variant of this kernel (128-row tiles) spilled 40..1776 B at every
    bucket in the AOT sweep (255 registers), and it would carry the same masks as the classic one.
  * USE_TMA: Q/K/V/O tiles move through tensor descriptors made in the kernel
    (tl.make_tensor_descriptor over one (batch, head)'s (rows, E) matrix: rows beyond L or S read as
    zero and the output store is clipped at L by the copy engine). Needs 16-byte aligned bases (the
    launcher checks; a contiguous view at an odd offset is not); otherwise plain loads (USE_TMA False)
    with only the key-boundary mask in the last block.
  * The scale is folded into exp2: the row max is taken on raw q.k, then p = exp2(s * qk_scale - m)
    (one FMA per element), qk_scale = scale * log2(e); lse is converted back to the natural log.
  * The loop over key blocks that need no boundary/causal test is a tl.range with num_stages: the
    pipeliner prefetches the next K/V tiles (TMA, 2-3 stages in shared memory) during this block's
    maths; only the last/diagonal blocks take the masked loop.
  * Overlap of the softmax with the next QK^T: not obtained (compiler facts, triton 3.9 and 3.6,
    sm_90): tl.range(..., warp_specialize=True) compiles to the same PTX as without it on sm_90
    (WARP_SPEC stays a constexpr option, off); a hand-pipelined loop (QK^T of block j+1 issued before
    block j's softmax) still gets `wgmma.wait_group 0` right after that QK^T, before the exp2s, and
    costs 254 registers and 256 KB shared memory at 128x128 - so it was not kept. Every wait is
    `wgmma.wait_group 0`; the gains here are the constexpr head dim, TMA and the 128-key blocks.
"""
from __future__ import annotations

import os
from contextlib import nullcontext as _nullcontext

import torch
import triton
import triton.language as tl

from . import attention as _classic

INTERPRET = _classic.INTERPRET
LOG2E = _classic.LOG2E
_WIDEN_BF16 = tl.constexpr(INTERPRET)  # as in kernels/attention.py: the 3.9 interpreter's bf16 dot

MODES = ("sm90", "classic")


def _read_mode() -> str:
    mode = os.environ.get("FASTATTN_TRITON_ATTN", "sm90").strip().lower() or "sm90"
    if mode not in MODES:
        raise ValueError(f"fastattn: environment variable 'FASTATTN_TRITON_ATTN' got {mode!r}; expected one of {MODES}")
    return mode


MODE = _read_mode()  # read once


def use_mode(mode: str) -> None:
    """Switch between "sm90" and "classic" for this process (benchmarks compare both in one run)."""
    global MODE
    if mode not in MODES:
        raise ValueError(f"fastattn: argument 'mode' got {mode!r}; expected one of {MODES}")
    MODE = mode


# ==================================================================================================
# Triton program
# ==================================================================================================
@triton.jit
def _sm90_block(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, start_n, offs_m, offs_d, S,
                qk_scale, causal, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BOUNDARY: tl.constexpr,
                USE_TMA: tl.constexpr):
    """One key block of the online softmax; m_i is the running max of raw q.k scaled (log2 units)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if USE_TMA:
        k = k_desc.load([start_n, 0])                                               # (BN, BD)
        v = v_desc.load([start_n, 0])
    else:
        kv_off = offs_n[:, None] * BLOCK_D + offs_d[None, :]
        if BOUNDARY:
            k = tl.load(k_base + kv_off, mask=offs_n[:, None] < S, other=0.0)
            v = tl.load(v_base + kv_off, mask=offs_n[:, None] < S, other=0.0)
        else:
            k = tl.load(k_base + kv_off)
            v = tl.load(v_base + kv_off)
    if _WIDEN_BF16 and k.dtype == tl.bfloat16:
        k = k.to(tl.float32)
    if _WIDEN_BF16 and v.dtype == tl.bfloat16:
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k))                                                      # (BM, BN) raw
    if BOUNDARY:
        n_diag = tl.where(causal, offs_n, 0)
        visible = (offs_n[None, :] < S) & (n_diag[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if BOUNDARY:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet: exp2 -> 0
    else:
        m_sub = m_new
    p = tl.math.exp2(s * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["Hq", "GROUP"])
def _attn_fwd_sm90_kernel(
    Q, K, V, Out, Lse,        # q (N,Hq,L,E), k (N,Hkv,S,E), v (N,Hkv,S,E), out (N,Hq,L,E), lse (N,Hq,L) f32
    qk_scale,                 # scale * log2(e), > 0
    Hq, GROUP, L, S,          # GROUP = Hq // Hkv; the head dim E == Ev == BLOCK_D
    causal,                   # runtime bool
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    pid_m = pid % num_m
    pid_m = tl.where(causal, num_m - 1 - pid_m, pid_m)  # causal: the longest rows first
    b = bh // Hq
    h = bh % Hq
    Hkv = Hq // GROUP
    bhk = b * Hkv + h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < L

    q_base = Q + bh.to(tl.int64) * L * BLOCK_D
    k_base = K + bhk.to(tl.int64) * S * BLOCK_D
    v_base = V + bhk.to(tl.int64) * S * BLOCK_D
    o_base = Out + bh.to(tl.int64) * L * BLOCK_D
    q_desc = Q
    k_desc = K
    v_desc = V
    o_desc = Out
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[L, BLOCK_D], strides=[BLOCK_D, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(k_base, shape=[S, BLOCK_D], strides=[BLOCK_D, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[S, BLOCK_D], strides=[BLOCK_D, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        o_desc = tl.make_tensor_descriptor(o_base, shape=[L, BLOCK_D], strides=[BLOCK_D, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        q = q_desc.load([start_m, 0])
    else:
        q = tl.load(q_base + offs_m[:, None] * BLOCK_D + offs_d[None, :],
                    mask=m_ok[:, None], other=0.0)
    if _WIDEN_BF16 and q.dtype == tl.bfloat16:
        q = q.to(tl.float32)

    # Key range [0, n_end); blocks below full_end need no boundary/causal test.
    n_end = tl.where(causal, tl.minimum(S, start_m + BLOCK_M), S)
    full_end = tl.where(causal, tl.minimum(n_end, start_m + 1), n_end)
    full_end = (full_end // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in tl.range(0, full_end, BLOCK_N, num_stages=LOOP_STAGES, warp_specialize=WARP_SPEC):
        acc, l_i, m_i = _sm90_block(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, start_n, offs_m, offs_d,
                                    S, qk_scale, causal, BLOCK_N, BLOCK_D, False, USE_TMA)
    for start_n in range(full_end, n_end, BLOCK_N):
        acc, l_i, m_i = _sm90_block(acc, l_i, m_i, q, k_desc, v_desc, k_base, v_base, start_n, offs_m, offs_d,
                                    S, qk_scale, causal, BLOCK_N, BLOCK_D, True, USE_TMA)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    if USE_TMA:
        o_desc.store([start_m, 0], out)
    else:
        tl.store(o_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], out,
                 mask=m_ok[:, None])
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


# ==================================================================================================
# Configurations (sm_90 only; tests/test_triton_sm90_attention.py compiles every one for sm_90 with
# triton 3.9 and 3.6 and asserts wgmma, TMA loads, no spills and shared memory <= 227 KB)
# ==================================================================================================
def _cfg(block_m, block_n, num_warps, num_stages, loop_stages=None):
    cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n,
                         "LOOP_STAGES": num_stages if loop_stages is None else loop_stages},
                        num_warps=num_warps, num_stages=num_stages)
    cfg.archs = (90,)
    return cfg


HEAD_DIM_BUCKETS = (32, 64, 128, 256)
# Tiles per head-dim bucket (fp16 and bf16 alike); the launcher takes the first, deterministically.
FWD_SM90_CONFIGS: dict[int, list] = {
    32: [_cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3)],
    64: [_cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3)],
    128: [_cfg(128, 128, 8, 3), _cfg(128, 64, 8, 3)],
    256: [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2)],
}
INTERPRET_CONFIG = _cfg(16, 16, 1, 1)


def compile_cases():
    """Every (head-dim bucket, config, USE_TMA) a launch on sm_90 can choose: each config runs with
    TMA (aligned bases) or with plain loads (a base not 16-byte aligned)."""
    return [(hd, cfg, tma) for hd in HEAD_DIM_BUCKETS for cfg in FWD_SM90_CONFIGS[hd] for tma in (True, False)]


def case_constexprs(hd: int, cfg, use_tma: bool, warp_spec: bool = False) -> dict:
    return dict(cfg.kwargs, BLOCK_D=hd, USE_TMA=use_tma, WARP_SPEC=warp_spec)


# ==================================================================================================
# Launcher
# ==================================================================================================
def _alloc(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")  # the current device, as the launch's


def _ensure_allocator():
    """tl.make_tensor_descriptor needs global scratch for the descriptors a program builds. triton's
    allocator is a ContextVar (per thread/context): set ours where none is set, on every launch
    (a backward thread starts with none); an allocator the application set is kept."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_alloc)


def serves(q, k, v, attn_mask, key_padding_mask, dropout_p, scale, force: bool = False) -> bool:
    """Whether this kernel serves the call (force: ignore device and mode, for the interpreter tests)."""
    if not force:
        if MODE != "sm90" or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
            return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if attn_mask is not None or key_padding_mask is not None or float(dropout_p) != 0.0:
        return False
    e, ev, s = q.shape[3], v.shape[3], k.shape[2]
    if e != ev or e not in HEAD_DIM_BUCKETS or s == 0 or not float(scale) > 0.0:
        return False
    return True


def forward(q, k, v, attn_mask, key_padding_mask, dropout_p: float, is_causal: bool, scale: float, seed,
            force: bool = False, use_tma: bool | None = None):
    """(out, lse) from the sm_90 kernel, or None when it does not serve the call (the caller then
    runs the classic kernels). Inputs as kernels.attention.attention_forward (already checked there).
    use_tma: None = where the layout allows; False = plain loads (the interpreter tests)."""
    if not serves(q, k, v, attn_mask, key_padding_mask, dropout_p, scale, force):
        return None
    n, hq, l, e = q.shape
    hkv, s = k.shape[1], k.shape[2]
    out = torch.empty((n, hq, l, e), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, hq, l), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_d = e
    aligned = all(t.data_ptr() % 16 == 0 for t in (q, k, v, out))
    tma = aligned and not INTERPRET if use_tma is None else (use_tma and aligned)
    if tma and not INTERPRET:
        _ensure_allocator()
    dims = dict(Hq=hq, GROUP=hq // hkv, L=l, S=s, causal=bool(is_causal), BLOCK_D=block_d,
                USE_TMA=tma, WARP_SPEC=False)
    qk_scale = float(scale) * LOG2E

    def launch(cfg):
        grid = (triton.cdiv(l, cfg.kwargs["BLOCK_M"]) * n * hq,)
        _attn_fwd_sm90_kernel[grid](q, k, v, out, lse, qk_scale, **dims, **cfg.kwargs,
                                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    # Deterministic, never timed inside the op (CUDA-graph capture, reproducibility): the first tile of
    # the bucket's list; both are proven by tests/test_triton_sm90_attention.py.
    cfg = INTERPRET_CONFIG if INTERPRET else FWD_SM90_CONFIGS[block_d][0]
    with torch.cuda.device(q.device) if q.is_cuda else _nullcontext():
        launch(cfg)
    return out, lse
