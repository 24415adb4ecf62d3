"""Fused attention in Triton: forward (online softmax) and backward (delta pre-pass, dK/dV, dQ).

Three layers, as everywhere in fastattn:
  * ``_attn_fwd_kernel``, ``_attn_bwd_delta_kernel``, ``_attn_bwd_dkdv_kernel``,
    ``_attn_bwd_dq_kernel``: the Triton programs;
  * ``attention_forward`` / ``attention_backward``: host launchers (allocate, pick a config, launch);
  * the op registration (torch.ops.fastattn.triton_attention_fwd/_bwd) lives in fastattn/attention.py.

What the launchers receive is fixed by fastattn/backends/README.md:
  q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev) contiguous, one dtype; query head h reads
  kv head h // (Hq // Hkv). attn_mask: None or an additive (N, Hq, L, S) view read through its
  strides (strides may be 0). key_padding_mask: None or bool (N, S), True = key ignored.
  seed: None or an int64 tensor (1,) seed or (2,) (seed, offset); element (b, h, i, j) is kept iff
  tl.rand(seed, offset + ((b*Hq + h)*L + i)*S + j) >= dropout_p (the kernels read both from the device). lse is the natural-log row log-sum-exp in
  float32, +inf for a row that sees no key (its output is 0 and its gradients are 0).

Design notes:
  * Scores are computed in the log2 domain without a mask: s2 = (q.k) * scale * log2(e), so the
    softmax uses exp2; lse is converted back to the natural log when stored. With a mask they stay in
    natural-log units, s = (q.k) * scale + mask (times log2(e) a mask of -3e38 would overflow to
    -inf: only -inf, set rather than added, excludes a key; any finite value is a score), and exp2
    takes (s - m) * log2(e). qk_scale is the scale in those units (the launcher's _Launch).
  * The backward reads the log-sum-exp through the delta pre-pass's split (base + rest, see
    SPLIT_LSE), so rows with huge mask values or logits get gradients consistent with the forward.
  * attn_mask and dropout are compile-time flags (HAS_MASK, HAS_DROPOUT), so the plain call compiles
    none of their code: 4 specialisations per kernel. Causality and key padding are runtime bools
    (`causal`, `has_kpm`): causality moves loop bounds, reverses the program order and adds one
    compare to the element test of the boundary blocks; key padding adds one uniform branch per key
    block in the forward and dQ (skipped when off) and costs dK/dV nothing per block (a key's rows of
    dK/dV depend on that key alone, so the padded rows are zeroed once at the end). Key blocks that
    need no boundary/causal test run in a loop without any element mask; only the first/last (or
    diagonal) blocks take the masked path.
  * Causal: key blocks wholly above the diagonal are never visited. Key padding: the forward and dQ
    visit only the key range [first unpadded, last unpadded] of each batch (kv_range, computed per
    launcher call by one launch of the small _kv_range_kernel, grid N, where eight torch ops took ~35 us
    of host time: see kv_range); the dK/dV kernel skips a key block that is wholly padded.
  * The backward is deterministic and uses no atomics: one program owns a K/V block and loops over
    every query block of every query head of its GQA group; dQ is a separate kernel.
  * Head dims 1..256 are padded to a power of two (at least 32: 1..16 share the 32 bucket, see
    configs.head_dim_bucket) and masked; L and S are arbitrary (boundary masks).
  * fp32 inputs use input_precision="ieee" (true fp32) unless
    torch.backends.cuda.matmul.allow_tf32 is set, then "tf32".
  * Block sizes, warps and stages come from kernels/configs.py (a table lookup, no timing). Nothing
    here touches a GPU at import time.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from . import configs
from ._seed import seed_offset_tensor
from .configs import INTERPRET, head_dim_bucket  # noqa: F401  (head_dim_bucket re-exported for the tests)

LOG2E = 1.4426950408889634


# ==================================================================================================
# Triton programs
# ==================================================================================================
# The interpreter of triton 3.9 multiplies bfloat16 tl.dot operands wrongly (it reads them as raw
# bits); under the interpreter only, bf16 operands are widened to fp32 as they are loaded (_load_tile).
# Compiled kernels never take that branch (a compile-time constant).
_WIDEN_BF16 = tl.constexpr(INTERPRET)


# Integer arguments whose value the JIT must not specialise on. Triton compiles a sibling kernel
# when an int argument equals 1 or is a multiple of 16; for these (GQA group, head count, the batch
# and head strides of the mask, the Philox seed) that buys no better code, but GROUP == 1 (no GQA,
# the common case) would otherwise launch a kernel the ahead-of-time check never compiled. With
# them unspecialised, the launched kernel is the one tests/test_triton_aot.py compiles
# (those arguments are plain i32/i64 there too).
_NO_SPECIALIZE = ["seed", "stride_mb", "stride_mh", "Hq", "GROUP"]


@triton.jit
def _load_tile(base, offs_r, offs_c, R, C, BOUNDARY: tl.constexpr):
    """The (len(offs_r), len(offs_c)) tile of a row-major (R, C) matrix at base. Columns past C read
    as 0; rows past R are masked only when BOUNDARY (interior tiles skip that test)."""
    ptrs = base + offs_r[:, None] * C + offs_c[None, :]
    if BOUNDARY:
        t = tl.load(ptrs, mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    else:
        t = tl.load(ptrs, mask=offs_c[None, :] < C, other=0.0)
    if _WIDEN_BF16 and t.dtype == tl.bfloat16:
        t = t.to(tl.float32)
    return t


@triton.jit
def _scores(qk, mask_rows, kpm_base, offs_m, offs_n, qk_scale, L, S, stride_ms, causal, has_kpm,
            BOUNDARY: tl.constexpr, HAS_MASK: tl.constexpr):
    """The (BM, BN) scores of query rows offs_m against keys offs_n from their products qk = q k^T, in
    the kernels' units (qk_scale is in them: log2 units without a mask, natural-log units with one),
    -inf where a key is excluded: a -inf mask value (set, not added: a NaN score stays out), key
    padding (has_kpm), and when BOUNDARY the key boundary and causality."""
    n_ok = offs_n < S
    s = qk * qk_scale
    if HAS_MASK:
        mvals = tl.load(mask_rows[:, None] + offs_n[None, :].to(tl.int64) * stride_ms,
                        mask=(offs_m[:, None] < L) & n_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(mvals == float("-inf"), float("-inf"), s + mvals)
    if has_kpm:  # a runtime flag: one uniform branch per key block
        pad = tl.load(kpm_base + offs_n, mask=n_ok, other=1)                      # (BN,) u8, 1 = ignore
        s = tl.where(pad[None, :] == 0, s, float("-inf"))
    if BOUNDARY:
        # Causal: key j is visible to row i iff j <= i. n_diag is 0 (every row sees it) otherwise.
        n_diag = tl.where(causal, offs_n, 0)
        visible = n_ok[None, :] & (n_diag[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _exp(x, HAS_MASK: tl.constexpr):
    """e**x for x in the kernels' units (natural log with a mask, log2 without)."""
    if HAS_MASK:
        return tl.math.exp2(x * 1.4426950408889634)
    else:
        return tl.math.exp2(x)


@triton.jit
def _log(x, HAS_MASK: tl.constexpr):
    """log(x) in the kernels' units."""
    if HAS_MASK:
        return tl.math.log2(x) * 0.6931471805599453
    else:
        return tl.math.log2(x)


@triton.jit
def _key_range(KvRange, b, start_m, S, causal, has_kpm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, full_end, n_end): the key blocks a query block visits are [lo, n_end); those below
    full_end need no boundary/causal test. Causal: none above the diagonal; key padding: only the
    batch's range [first, last] of unpadded keys."""
    n_end = tl.where(causal, tl.minimum(S, start_m + BLOCK_M), S)
    kv_lo = tl.load(KvRange + 2 * b, mask=has_kpm, other=0)       # no key padding: no load, [0, S)
    kv_hi = tl.load(KvRange + 2 * b + 1, mask=has_kpm, other=S)
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    n_end = tl.minimum(n_end, kv_hi)
    full_end = tl.where(causal, tl.minimum(n_end, start_m + 1), n_end)
    full_end = tl.maximum((full_end // BLOCK_N) * BLOCK_N, lo)
    return lo, full_end, n_end


@triton.jit
def _query_block(K, V, Mask, Kpm, seed, stride_mb, stride_mh, stride_ml, Hq, GROUP, L, S, HEAD_D, HEAD_DV,
                 causal, BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """Where the forward's and dQ's program for one query block reads: (bh, b, start_m, offs_m, k_base,
    v_base, mask_rows (BM,) pointers, kpm_base, drop_rows (BM,) i64 Philox counters). Causal: the
    longest rows first (tail balance)."""
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    pid_m = pid % num_m
    pid_m = tl.where(causal, num_m - 1 - pid_m, pid_m)
    b = bh // Hq
    h = bh % Hq
    hkv = b * (Hq // GROUP) + h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    k_base = K + hkv.to(tl.int64) * S * HEAD_D
    v_base = V + hkv.to(tl.int64) * S * HEAD_DV
    mask_rows = Mask
    if HAS_MASK:
        mask_rows = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                     + offs_m.to(tl.int64) * stride_ml)
    kpm_base = Kpm + b.to(tl.int64) * S
    drop_rows = (bh.to(tl.int64) * L + offs_m) * S
    if HAS_DROPOUT:  # seed points at (Philox seed, counter offset), read on the device (graph-safe)
        drop_rows += tl.load(seed + 1)
    return bh, b, start_m, offs_m, k_base, v_base, mask_rows, kpm_base, drop_rows


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_rows, kpm_base, drop_rows,
               start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
               L, S, HEAD_D, HEAD_DV, stride_ms,
               causal, has_kpm, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
               HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """One key block of the forward's online softmax. acc (BM, BDV) f32, l_i/m_i (BM,) f32 (m_i in
    the kernels' units)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, offs_n, offs_d, S, HEAD_D, BOUNDARY)                  # (BN, BD)
    s = _scores(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), mask_rows, kpm_base, offs_m, offs_n,
                qk_scale, L, S, stride_ms, causal, has_kpm, BOUNDARY, HAS_MASK)  # (BM, BN)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only -inf so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = _exp(s - m_sub[:, None], HAS_MASK)
    alpha = _exp(m_i - m_sub, HAS_MASK)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # The normaliser l_i sums every probability; only the kept ones reach the output.
        keep = tl.rand(seed, drop_rows[:, None] + offs_n[None, :]) >= dropout_p
        p = tl.where(keep, p, 0.0)
    v = _load_tile(v_base, offs_n, offs_dv, S, HEAD_DV, BOUNDARY)                # (BN, BDV)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,        # q (N,Hq,L,E), k (N,Hkv,S,E), v (N,Hkv,S,Ev), out (N,Hq,L,Ev), lse (N,Hq,L) f32
    Mask, Kpm, KvRange,       # mask: additive (N,Hq,L,S) strided view; kpm (N,S) u8; kv_range (N,2) i32
    seed, dropout_p, qk_scale,  # *i64 (philox seed, counter offset), dropout prob, scale in kernel units
    stride_mb, stride_mh, stride_ml, stride_ms,  # mask strides (elements, may be 0)
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,  # GROUP = Hq // Hkv
    causal,                   # bool (a runtime flag: it only moves loop bounds and the boundary test)
    has_kpm,                  # bool (a runtime flag: one uniform branch per key block)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    bh, b, start_m, offs_m, k_base, v_base, mask_rows, kpm_base, drop_rows = _query_block(
        K, V, Mask, Kpm, seed, stride_mb, stride_mh, stride_ml, Hq, GROUP, L, S, HEAD_D, HEAD_DV, causal,
        BLOCK_M, HAS_MASK, HAS_DROPOUT)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    q = _load_tile(Q + bh.to(tl.int64) * L * HEAD_D, offs_m, offs_d, L, HEAD_D, True)        # (BM, BD)
    if HAS_DROPOUT:
        seed = tl.load(seed)

    lo, full_end, n_end = _key_range(KvRange, b, start_m, S, causal, has_kpm, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_rows, kpm_base, drop_rows,
                                   start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                   L, S, HEAD_D, HEAD_DV, stride_ms,
                                   causal, has_kpm, BLOCK_N, False, HAS_MASK, HAS_DROPOUT,
                                   INPUT_PRECISION)
    for start_n in range(full_end, n_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_rows, kpm_base, drop_rows,
                                   start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                   L, S, HEAD_D, HEAD_DV, stride_ms,
                                   causal, has_kpm, BLOCK_N, True, HAS_MASK, HAS_DROPOUT,
                                   INPUT_PRECISION)

    seen = l_i != 0.0  # a row that saw no key (a NaN sum counts as seen: the NaN propagates)
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    o_base = Out + bh.to(tl.int64) * L * HEAD_DV
    tl.store(o_base + offs_m[:, None] * HEAD_DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    if HAS_MASK:  # m_i in natural-log units
        lse = m_i + tl.math.log2(tl.where(seen, l_i, 1.0)) * 0.6931471805599453
    else:
        lse = (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453
    lse = tl.where(seen, lse, float("inf"))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


# ---- the backward's log-sum-exp: one interface for every backward kernel ---------------------------
# The forward saves lse = m + log(l) (row max, row sum) as one float32, rounded to the ulp of m. Where
# |lse| is large (huge mask values, large logits) that rounding is what P = exp(s - lse) is made of:
# P is off by up to ulp(lse)/2 relative, and where log(l) vanishes against m (m = -1e30) a row's P
# sums to S instead of 1. The delta pre-pass therefore hands the backward the log-sum-exp as two
# float32 numbers per row (LseSplit (N, Hq, 2, L): [.., 0, i] base, [.., 1, i] rest; one pointer, the
# rest a row of L after the base), in the kernels' units (log2 without a mask,
# natural log with one), and every backward kernel takes P from them through _bwd_probs alone:
#   P = exp(s - base - rest), (s - base) first.
# A row with |lse| < SPLIT_LSE gets base = lse, rest = 0 and delta = rowsum(dO O), as before; a row
# with |lse| >= SPLIT_LSE gets base = its row max m, rest = log(l) and delta = rowsum(P dP),
# recomputed over its keys by the pre-pass (_split_rows). Only blocks holding such a row do that work.
SPLIT_LSE = tl.constexpr(32.0)  # |lse| from which a row's log-sum-exp is split
SPLIT_N = 16                    # keys per step of that recompute
SPLIT_D = tl.constexpr(32)      # head-dim slice per product (every head-dim bucket is a multiple of it)


@triton.jit
def _bwd_probs(s, base, rest, HAS_MASK: tl.constexpr):
    """P from scores s (in the kernels' units) and the pre-pass's (base, rest), broadcast to s's shape
    by the caller."""
    return _exp((s - base) - rest, HAS_MASK)


@triton.jit
def _sliced_product(a_base, b_base, offs_a, offs_b, RA, RB, C, BA: tl.constexpr, BB: tl.constexpr,
                    BC: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A B^T for rows offs_a of the row-major (RA, C) matrix at a_base and rows offs_b of the (RB, C)
    one at b_base, SPLIT_D columns at a time, each slice's product accumulated onto the previous. A's
    load is volatile: the same rows every key block, never hoisted out of the caller's loop into
    registers held across it (with one slice, C <= SPLIT_D, they would be: spills)."""
    acc = tl.zeros([BA, BB], tl.float32)
    for c0 in range(0, BC, SPLIT_D):
        offs_c = c0 + tl.arange(0, SPLIT_D)
        a = tl.load(a_base + offs_a[:, None] * C + offs_c[None, :],
                    mask=(offs_a[:, None] < RA) & (offs_c[None, :] < C), other=0.0, volatile=True)
        if _WIDEN_BF16 and a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        b = _load_tile(b_base, offs_b, offs_c, RB, C, True)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _big_rows(lse, offs_m, L):
    """The rows offs_m whose forward log-sum-exp lse is split (|lse| >= SPLIT_LSE, finite)."""
    return (offs_m < L) & (tl.abs(lse) >= SPLIT_LSE) & (lse != float("inf"))


@triton.jit
def _split_rows(DOut, Lse, Delta, LseSplit, Q, K, V, mask_bh, Kpm, KvRange, seed, dropout_p, qk_scale,
                stride_ml, stride_ms, bh, b, hk, Hkv, start_m, offs_m, L, S, HEAD_D, HEAD_DV, causal, has_kpm,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SPLIT_N: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The query rows offs_m (from start_m), of which those that are big (_big_rows) get: the row
    max m and sum l recomputed as the forward does, base = m, rest = log(l), and delta = rowsum(P dP) with
    P = exp(s - m) / l unrounded and dP = dO V^T as the dQ kernel computes it (times the kept mask
    / (1 - p) under dropout), as torch's math does. rowsum(dO O) from an output rounded to 16 bits is
    off by about 2^-9 |dO| |O|, and any rounding of delta apart from dP's is carried by
    dS = P (dP - delta) into dQ and dK times the logit scale (a one-hot row's exact dS is 0).
    The products run over the head dim in SPLIT_D slices (whole-width fp32 operands would stay in
    registers and spill); a slice's product accumulates onto the previous one's. The results are stored
    after every key block (the last store stands): stores after the loop keep their row pointers live
    across it unused, and ptxas saves such values to a stack frame (around its CALL.REL.NOINC loop
    exit, or to lower its register count)."""
    row = bh.to(tl.int64) * L + offs_m
    q_base = Q + bh.to(tl.int64) * L * HEAD_D
    do_base = DOut + bh.to(tl.int64) * L * HEAD_DV
    k_base = K + (b * Hkv + hk).to(tl.int64) * S * HEAD_D
    v_base = V + (b * Hkv + hk).to(tl.int64) * S * HEAD_DV
    mask_rows = mask_bh + offs_m.to(tl.int64) * stride_ml
    kpm_base = Kpm + b.to(tl.int64) * S
    drop_rows = row * S
    philox = 0
    if HAS_DROPOUT:  # seed points at (Philox seed, counter offset)
        drop_rows += tl.load(seed + 1)
        philox = tl.load(seed)
    lse_ptr = LseSplit + bh.to(tl.int64) * 2 * L + offs_m
    big = _big_rows(tl.load(Lse + row, mask=offs_m < L, other=0.0), offs_m, L)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    dd = tl.zeros([BLOCK_M], tl.float32)  # rowsum(exp(s - m) dP), rescaled like l_i
    lo, _full, n_end = _key_range(KvRange, b, start_m, S, causal, has_kpm, BLOCK_M, SPLIT_N)
    for start_n in range(lo, n_end, SPLIT_N):
        offs_n = start_n + tl.arange(0, SPLIT_N)
        qk = _sliced_product(q_base, k_base, offs_m, offs_n, L, S, HEAD_D, BLOCK_M, SPLIT_N, BLOCK_D,
                             INPUT_PRECISION)
        s = _scores(qk, mask_rows, kpm_base, offs_m, offs_n, qk_scale, L, S, stride_ms, causal, has_kpm,
                    True, HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = _exp(s - m_sub[:, None], HAS_MASK)
        alpha = _exp(m_i - m_sub, HAS_MASK)
        dp = _sliced_product(do_base, v_base, offs_m, offs_n, L, S, HEAD_DV, BLOCK_M, SPLIT_N, BLOCK_DV,
                             INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = tl.rand(philox, drop_rows[:, None] + offs_n[None, :]) >= dropout_p
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        dd = dd * alpha + tl.sum(p * dp, 1)
        m_i = m_new
        # Stored after every key block, the last one's last: l_i is 0 only while the recompute has
        # seen none of the keys the forward saw (then, and if it never does, the plain values stay).
        split = big & (l_i != 0.0)
        l_safe = tl.where(split, l_i, 1.0)
        tl.store(Delta + row, dd / l_safe, mask=split)
        tl.store(lse_ptr, m_i, mask=split)
        tl.store(lse_ptr + L, _log(l_safe, HAS_MASK), mask=split)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_delta_kernel(
    Out, DOut, Lse,             # out, grad_out (N,Hq,L,Ev); lse (N,Hq,L) f32 from the forward
    Delta, LseSplit,            # written: delta (N,Hq,L) f32, the split log-sum-exp (N,Hq,2,L) f32
    Q, K, V, Mask, Kpm, KvRange,  # as in the dQ kernel; read only for rows with |lse| >= SPLIT_LSE
    seed, dropout_p, qk_scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal, has_kpm,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """delta = rowsum(dO O) in float32 and the log-sum-exp as (base, rest) = (lse, 0) for every row;
    then, in a block holding rows with |lse| >= SPLIT_LSE, _split_rows overwrites theirs."""
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    start_m = (pid % num_m) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    ok = m_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    base = bh.to(tl.int64) * L * HEAD_DV
    ptrs = offs_m[:, None] * HEAD_DV + offs_dv[None, :]
    o = tl.load(Out + base + ptrs, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + base + ptrs, mask=ok, other=0.0).to(tl.float32)
    row = bh.to(tl.int64) * L + offs_m
    lse = tl.load(Lse + row, mask=m_ok, other=0.0)
    tl.store(Delta + row, tl.sum(o * do, 1), mask=m_ok)
    lse_ptr = LseSplit + bh.to(tl.int64) * 2 * L + offs_m
    if HAS_MASK:
        tl.store(lse_ptr, lse, mask=m_ok)
    else:
        tl.store(lse_ptr, lse * 1.4426950408889634, mask=m_ok)
    tl.store(lse_ptr + L, tl.zeros([BLOCK_M], tl.float32), mask=m_ok)
    if tl.max(_big_rows(lse, offs_m, L).to(tl.int32), 0) > 0:  # rare: huge mask values or logits
        tl.debug_barrier()  # the stores above land before _split_rows overwrites some of them
        b = bh // Hq
        h = bh % Hq
        mask_bh = Mask
        if HAS_MASK:
            mask_bh = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        _split_rows(DOut, Lse, Delta, LseSplit, Q, K, V, mask_bh, Kpm, KvRange, seed, dropout_p, qk_scale,
                    stride_ml, stride_ms, bh, b, h // GROUP, Hq // GROUP, start_m, offs_m, L, S, HEAD_D,
                    HEAD_DV, causal, has_kpm, BLOCK_M, BLOCK_D, BLOCK_DV, SPLIT_N, HAS_MASK, HAS_DROPOUT,
                    INPUT_PRECISION)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, lse_ptr, delta_base, mask_cols, drop_base,
                start_m, offs_n, offs_d, offs_dv, seed, dropout_p, qk_scale,
                L, S, HEAD_D, HEAD_DV, stride_ml,
                causal, BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """One query block's contribution to a resident K/V block, transposed: (BN, BM) tiles. Padded
    keys are not tested here: a key's rows of dK/dV depend on that key alone, so the caller zeroes
    the padded keys' rows once at the end."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    q = _load_tile(q_base, offs_m, offs_d, L, HEAD_D, BOUNDARY)                  # (BM, BD)
    do = _load_tile(do_base, offs_m, offs_dv, L, HEAD_DV, BOUNDARY)              # (BM, BDV)
    base = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf"))              # the pre-pass's split
    rest = tl.load(lse_ptr + L + offs_m, mask=m_ok, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale      # (BN, BM), kernel units
    if HAS_MASK:  # as in _scores
        mvals = tl.load(mask_cols[:, None] + offs_m[None, :].to(tl.int64) * stride_ml,
                        mask=(offs_n[:, None] < S) & m_ok[None, :], other=0.0).to(tl.float32)
        sT = tl.where(mvals == float("-inf"), float("-inf"), sT + mvals)
    pT = _bwd_probs(sT, base[None, :], rest[None, :], HAS_MASK)
    if BOUNDARY:
        n_diag = tl.where(causal, offs_n, 0)  # as in _fwd_block
        visible = (offs_n[:, None] < S) & m_ok[None, :] & (n_diag[:, None] <= offs_m[None, :])
        pT = tl.where(visible, pT, 0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)               # (BN, BM)
    if HAS_DROPOUT:
        # volatile: a load per block, never hoisted into a register held across the loop (spills)
        keep = tl.rand(tl.load(seed, volatile=True), drop_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None]) >= dropout_p
        pT_kept = tl.where(keep, pT, 0.0)  # the 1/(1-p) scale is applied to dv once, at the end
        dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
    else:
        pT_kept = pT
    dv = tl.dot(pT_kept.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_query_blocks(kpm_row, offs_n, start_n, L, S, causal, has_kpm,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The query blocks a dK/dV program of keys [start_n, start_n + BLOCK_N) visits (also used by
    kernels/attention_sm90_bwd.py): (key_ok, m_lo, f_lo, f_hi, n_head, n_bound)."""
    n_ok = offs_n < S
    # Query blocks to visit: [m_lo, m_end). Those in [f_lo, f_hi) need no boundary/causal test.
    m_end = tl.cdiv(L, BLOCK_M) * BLOCK_M
    m_lo = tl.where(causal, tl.minimum((start_n // BLOCK_M) * BLOCK_M, m_end), 0)
    f_lo = tl.where(causal, tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, 0)
    f_hi = (L // BLOCK_M) * BLOCK_M
    # Key padding (a runtime flag): a padded key's rows of dK/dV are zeroed once at the end, and a
    # key block that is wholly padded visits nothing.
    pad = tl.load(kpm_row + offs_n, mask=n_ok & has_kpm, other=0)
    key_ok = n_ok & (pad == 0)
    m_lo = tl.where(tl.sum(key_ok.to(tl.int32), 0) > 0, m_lo, m_end)
    # The last key block (partly beyond S): every query block needs the key boundary test.
    f_lo = tl.where(start_n + BLOCK_N > S, m_end, f_lo)
    f_lo = tl.minimum(tl.maximum(f_lo, m_lo), m_end)
    f_hi = tl.maximum(f_hi, f_lo)
    # Query blocks [m_lo, f_lo) and [f_hi, m_end) take the boundary/causal test: one loop over both.
    n_head = (f_lo - m_lo) // BLOCK_M
    n_bound = n_head + (m_end - f_hi) // BLOCK_M
    return key_ok, m_lo, f_lo, f_hi, n_head, n_bound


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut,              # q (N,Hq,L,E), k (N,Hkv,S,E), v (N,Hkv,S,Ev), dO (N,Hq,L,Ev)
    LseSplit, Delta,            # (N,Hq,2,L) and (N,Hq,L) f32 from the delta pre-pass (see SPLIT_LSE)
    DK, DV,                     # dk (N,Hkv,S,E), dv (N,Hkv,S,Ev)
    Mask, Kpm,                  # additive (N,Hq,L,S) strided view; (N,S) u8
    seed, dropout_p, qk_scale, sm_scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal, has_kpm,            # runtime bools
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    Hkv = Hq // GROUP
    num_n = tl.cdiv(S, BLOCK_N)
    pid = tl.program_id(0)
    bhk = pid // num_n
    start_n = (pid % num_n) * BLOCK_N
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < S

    k = _load_tile(K + bhk.to(tl.int64) * S * HEAD_D, offs_n, offs_d, S, HEAD_D, True)       # (BN, BD)
    v = _load_tile(V + bhk.to(tl.int64) * S * HEAD_DV, offs_n, offs_dv, S, HEAD_DV, True)    # (BN, BDV)

    key_ok, m_lo, f_lo, f_hi, n_head, n_bound = _dkdv_query_blocks(Kpm + b.to(tl.int64) * S, offs_n, start_n, L, S,
                                                                    causal, has_kpm, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + bh.to(tl.int64) * L * HEAD_D
        do_base = DOut + bh.to(tl.int64) * L * HEAD_DV
        lse_ptr = LseSplit + bh.to(tl.int64) * 2 * L
        delta_base = Delta + bh.to(tl.int64) * L
        mask_cols = Mask
        if HAS_MASK:
            mask_cols = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                         + offs_n.to(tl.int64) * stride_ms)                        # (BN,) pointers
        drop_base = bh.to(tl.int64) * L * S
        if HAS_DROPOUT:  # seed points at (Philox seed, counter offset), read on the device (graph-safe)
            drop_base += tl.load(seed + 1)
        for start_m in range(f_lo, f_hi, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_ptr, delta_base, mask_cols, drop_base,
                                 start_m, offs_n, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                 L, S, HEAD_D, HEAD_DV, stride_ml,
                                 causal, BLOCK_M, False, HAS_MASK, HAS_DROPOUT, INPUT_PRECISION)
        for i in range(0, n_bound):
            start_m = tl.where(i < n_head, m_lo + i * BLOCK_M, f_hi + (i - n_head) * BLOCK_M)
            dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, lse_ptr, delta_base, mask_cols, drop_base,
                                 start_m, offs_n, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                 L, S, HEAD_D, HEAD_DV, stride_ml,
                                 causal, BLOCK_M, True, HAS_MASK, HAS_DROPOUT, INPUT_PRECISION)

    if HAS_DROPOUT:
        dv = dv / (1.0 - dropout_p)
    dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
    dv = tl.where(key_ok[:, None], dv, 0.0)
    tl.store(DK + bhk.to(tl.int64) * S * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(DV + bhk.to(tl.int64) * S * HEAD_DV + offs_n[:, None] * HEAD_DV + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _dq_block(dq, q, do, base, rest, delta, k_base, v_base, mask_rows, kpm_base, drop_rows,
              start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
              L, S, HEAD_D, HEAD_DV, stride_ms,
              causal, has_kpm, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """One key block's contribution to a resident dQ block (BM, BD)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(k_base, offs_n, offs_d, S, HEAD_D, BOUNDARY)                  # (BN, BD)
    v = _load_tile(v_base, offs_n, offs_dv, S, HEAD_DV, BOUNDARY)                # (BN, BDV)
    s = _scores(tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION), mask_rows, kpm_base, offs_m, offs_n,
                qk_scale, L, S, stride_ms, causal, has_kpm, BOUNDARY, HAS_MASK)  # (BM, BN)
    p = _bwd_probs(s, base[:, None], rest[:, None], HAS_MASK)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)                # (BM, BN)
    if HAS_DROPOUT:
        # volatile: a load per block, never hoisted into a register held across the loop (spills)
        keep = tl.rand(tl.load(seed, volatile=True), drop_rows[:, None] + offs_n[None, :]) >= dropout_p
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, LseSplit, Delta,  # as in _attn_bwd_dkdv_kernel
    DQ,                         # dq (N,Hq,L,E)
    Mask, Kpm, KvRange,
    seed, dropout_p, qk_scale, sm_scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal, has_kpm,            # runtime bools
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    bh, b, start_m, offs_m, k_base, v_base, mask_rows, kpm_base, drop_rows = _query_block(
        K, V, Mask, Kpm, seed, stride_mb, stride_mh, stride_ml, Hq, GROUP, L, S, HEAD_D, HEAD_DV, causal,
        BLOCK_M, HAS_MASK, HAS_DROPOUT)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L
    q = _load_tile(Q + bh.to(tl.int64) * L * HEAD_D, offs_m, offs_d, L, HEAD_D, True)        # (BM, BD)
    do = _load_tile(DOut + bh.to(tl.int64) * L * HEAD_DV, offs_m, offs_dv, L, HEAD_DV, True)  # (BM, BDV)
    lse_ptr = LseSplit + bh.to(tl.int64) * 2 * L + offs_m                        # the pre-pass's split lse
    base = tl.load(lse_ptr, mask=m_ok, other=float("inf"))
    rest = tl.load(lse_ptr + L, mask=m_ok, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)

    lo, full_end, n_end = _key_range(KvRange, b, start_m, S, causal, has_kpm, BLOCK_M, BLOCK_N)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, full_end, BLOCK_N):
        dq = _dq_block(dq, q, do, base, rest, delta, k_base, v_base, mask_rows, kpm_base, drop_rows,
                       start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                       L, S, HEAD_D, HEAD_DV, stride_ms,
                       causal, has_kpm, BLOCK_N, False, HAS_MASK, HAS_DROPOUT, INPUT_PRECISION)
    for start_n in range(full_end, n_end, BLOCK_N):
        dq = _dq_block(dq, q, do, base, rest, delta, k_base, v_base, mask_rows, kpm_base, drop_rows,
                       start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                       L, S, HEAD_D, HEAD_DV, stride_ms,
                       causal, has_kpm, BLOCK_N, True, HAS_MASK, HAS_DROPOUT, INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + bh.to(tl.int64) * L * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D))


# ---- key padding: the key range each batch element visits ------------------------------------------
KV_RANGE_BLOCK = 1024   # keys per step of _kv_range_kernel (the AOT-checked value; tests pass smaller ones)
KV_RANGE_WARPS = 4
KV_RANGE_STAGES = 1


@triton.jit(do_not_specialize=["S"])
def _kv_range_kernel(Kpm, KvRange, S, BLOCK: tl.constexpr):
    """kv_range[b] = [first unpadded key, last unpadded key + 1] of batch element b (program b), int32;
    a wholly padded row gets [S, 0]. Kpm (N, S) u8, 1 = ignore; KvRange (N, 2) i32. The row is read
    BLOCK keys at a time into elementwise running min/max vectors, reduced once at the end."""
    b = tl.program_id(0)
    row = Kpm + b.to(tl.int64) * S
    offs = tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], tl.int32) + S        # min over unpadded keys j of j (S: none)
    hi = tl.zeros([BLOCK], tl.int32)            # max over unpadded keys j of j + 1 (0: none)
    for start in range(0, S, BLOCK):
        idx = start + offs
        pad = tl.load(row + idx, mask=idx < S, other=1)
        keep = pad == 0
        lo = tl.minimum(lo, tl.where(keep, idx, S))
        hi = tl.maximum(hi, tl.where(keep, idx + 1, 0))
    tl.store(KvRange + 2 * b, tl.min(lo, 0))
    tl.store(KvRange + 2 * b + 1, tl.max(hi, 0))


# ==================================================================================================
# What the ahead-of-time check compiles
# ==================================================================================================
KERNELS = {"fwd": _attn_fwd_kernel, "bwd_dkdv": _attn_bwd_dkdv_kernel, "bwd_dq": _attn_bwd_dq_kernel,
           "bwd_delta": _attn_bwd_delta_kernel}
# (_kv_range_kernel is compiled by its own check, tests/aot/kv_range.py: one tile, no table)


def compile_cases(arch: int) -> list:
    """Every distinct (kernel name, dtype class, head-dim bucket, variant, Tile) a launch on arch family
    `arch` can choose (the union over sequence buckets of configs.ATTENTION), and the delta pre-pass
    (configs.delta_tile) once per dtype class, head-dim bucket and variant of the dQ kernel."""
    cases = []
    for (name, dc, hd, _sq, var, a), tile in configs.ATTENTION.items():
        case = (name, dc, hd, var, tile)
        if a == arch and case not in cases:
            cases.append(case)
    for name, dc, hd, var, _tile in list(cases):
        case = ("bwd_delta", dc, hd, var, configs.delta_tile(dc))
        if name == "bwd_dq" and case not in cases:
            cases.append(case)
    return cases


# ==================================================================================================
# Host launchers. They trust the call: fastattn's Python API has validated shapes, dtypes, devices,
# contiguity and dropout_p; the asserts below only guard the launchers' own assumptions.
# ==================================================================================================
_DUMMIES: dict = {}


def _dummy(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A 16-byte tensor standing in for an absent pointer argument (never read), made once per device
    and dtype so that every launch has the same argument types as the compiled (and AOT-checked)
    kernel."""
    t = _DUMMIES.get((device, dtype))
    if t is None:
        t = _DUMMIES[device, dtype] = torch.zeros(16 // torch.empty((), dtype=dtype).element_size(),
                                                  dtype=dtype, device=device)
    return t


def kv_range_torch(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """kv_range (N, 2) int32 = [first, last + 1] unpadded key per batch element of a bool (N, S) mask
    ([S, 0] for a wholly padded row), in torch ops: what _kv_range_kernel computes, for tensors no
    Triton kernel can run on (CPU tensors outside the interpreter) and as the tests' reference."""
    kpm = key_padding_mask
    s = kpm.shape[1]
    keep = ~kpm
    idx = torch.arange(s, device=kpm.device, dtype=torch.int32)
    first = torch.where(keep, idx, s).amin(1)
    last = torch.where(keep, idx + 1, 0).amax(1)
    return torch.stack([first, last], 1).to(torch.int32).contiguous()


def kv_range(kpm_u8: torch.Tensor, block: int = KV_RANGE_BLOCK) -> torch.Tensor:
    """kv_range (N, 2) int32 of a contiguous u8 (N, S) key padding mask (1 = ignore), by one launch of
    _kv_range_kernel (grid N): one allocation and one launch per call, where kv_range_torch's eight
    torch ops cost ~35 us of host time per call (and eight launches on a GPU)."""
    n, s = kpm_u8.shape
    out = torch.empty((n, 2), dtype=torch.int32, device=kpm_u8.device)
    if n:
        _kv_range_kernel[(n,)](kpm_u8, out, s, BLOCK=block, num_warps=KV_RANGE_WARPS,
                               num_stages=KV_RANGE_STAGES)
    return out


def _kpm_args(key_padding_mask, q, s):
    """(kpm as u8 (N, S), kv_range (N, 2) i32 = [first, last + 1] unpadded key per batch)."""
    if key_padding_mask is None:
        return _dummy(q.device, torch.uint8), _dummy(q.device, torch.int32)
    assert key_padding_mask.dtype == torch.bool and tuple(key_padding_mask.shape) == (q.shape[0], s)
    kpm = key_padding_mask.contiguous().view(torch.uint8)
    if kpm.is_cuda or INTERPRET:
        return kpm, kv_range(kpm)
    return kpm, kv_range_torch(key_padding_mask)  # CPU tensors outside the interpreter: no kernel can run


def _seed_arg(dropout_p, seed, device):
    """The kernels' `seed` argument: an int64 (2,) tensor (Philox seed, counter offset) on `device`,
    read by the kernel itself, so a CUDA graph replays with the generator state of the replay."""
    if dropout_p == 0.0:
        return torch.empty(2, dtype=torch.int64, device=device)  # never read
    return seed_offset_tensor(seed, device)


class _Launch:
    """What every kernel of one call shares: argument values, flags and the tile lookup."""

    def __init__(self, q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed):
        n, hq, l, e = q.shape
        hkv, s, ev = k.shape[1], k.shape[2], v.shape[3]
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous() and hq % hkv == 0
        self.n, self.hq, self.hkv, self.l, self.s, self.ev = n, hq, hkv, l, s, ev
        self.device = q.device
        self.dc = configs.dtype_class(q.dtype)
        self.hd = max(configs.head_dim_bucket(e), configs.head_dim_bucket(ev))
        self.seq = configs.seq_bucket(l, s)
        self.arch = 80 if configs.INTERPRET or not q.is_cuda else configs.device_arch(q.device)
        if attn_mask is None:
            self.mask, self.mstrides = _dummy(q.device, torch.float32), (0, 0, 0, 0)  # the AOT-checked *fp32 type
        else:
            assert tuple(attn_mask.shape) == (n, hq, l, s)
            if attn_mask.dtype != torch.float32:  # the contract sends float32; a 16-bit mask is widened
                attn_mask = attn_mask.float()
            self.mask, self.mstrides = attn_mask, tuple(attn_mask.stride())
        self.kpm, self.kv_range = _kpm_args(key_padding_mask, q, s)
        self.seed = _seed_arg(float(dropout_p), seed, q.device)
        self.dropout_p = float(dropout_p)
        # the score scale in the kernels' units: log2 without a mask, natural log with one (a mask
        # value of -3e38 is a score, and times log2(e) it would overflow to -inf)
        self.qk_scale = float(scale) if attn_mask is not None else float(scale) * LOG2E
        self.scale = float(scale)
        self.flags = dict(HAS_MASK=attn_mask is not None, HAS_DROPOUT=self.dropout_p > 0.0,
                          INPUT_PRECISION=configs.input_precision(self.dc))
        self.variant = configs.variant(attn_mask is not None, self.dropout_p > 0.0)
        # causal and key padding are runtime bools (typed u1/i1 by the JIT, never specialised on
        # their value): one compiled kernel serves every combination of them.
        self.dims = dict(Hq=hq, GROUP=hq // hkv, L=l, S=s, HEAD_D=e, HEAD_DV=ev, causal=bool(is_causal),
                         has_kpm=key_padding_mask is not None,
                         BLOCK_D=configs.head_dim_bucket(e), BLOCK_DV=configs.head_dim_bucket(ev))

    def tile(self, kernel: str) -> configs.Tile:
        return configs.attention_config(kernel, self.dc, self.hd, self.seq, self.variant, self.arch)

    def flags_for(self, t: configs.Tile) -> dict:
        """The compile-time flags of a launch with tile t (a tile may force its products' precision)."""
        return dict(self.flags, INPUT_PRECISION=t.precision) if t.precision else self.flags


def _device_of(t: torch.Tensor):
    """The launches run on t's CUDA device (inputs on cuda:1 launch there, not on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_forward(q, k, v, attn_mask, key_padding_mask, dropout_p: float, is_causal: bool, scale: float,
                      seed):
    """Fused attention forward.

    q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev): contiguous, one dtype (fp16/bf16/fp32).
    attn_mask: None or additive (N, Hq, L, S) strided view (q's dtype). key_padding_mask: None or
    bool (N, S), True = key ignored. seed: None, or when dropout_p > 0 an int64 tensor: (1,) seed (counter
    offset 0) or (2,) (seed, counter offset), on the CPU or on q's device (see fastattn._philox).
    Returns out (N, Hq, L, Ev) in q's dtype and lse (N, Hq, L) float32 (natural log, +inf for a row
    that sees no key; its output row is 0).
    """
    # Small problems (S <= 256): kernels/attention_small.py, one program per (batch, head)
    # (FASTATTN_TRITON_SMALL=0: never). sm_90 devices: kernels/attention_sm90.py serves the cases it
    # covers (FASTATTN_TRITON_ATTN=classic: never).
    from . import attention_sm90, attention_small
    res = attention_small.forward(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed)
    if res is not None:
        return res
    res = attention_sm90.forward(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed)
    if res is not None:
        return res
    n, hq, l, _ = q.shape
    ev = v.shape[3]
    out = torch.empty((n, hq, l, ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, hq, l), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    with _device_of(q):
        c = _Launch(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed)
        t = c.tile("fwd")
        ms = c.mstrides
        _attn_fwd_kernel[(triton.cdiv(l, t.block_m) * n * hq,)](
            q, k, v, out, lse, c.mask, c.kpm, c.kv_range, c.seed, c.dropout_p, c.qk_scale,
            ms[0], ms[1], ms[2], ms[3], **c.dims, **c.flags_for(t), **t.kwargs,
            num_warps=t.num_warps, num_stages=t.num_stages)
    return out, lse


def backward_prepass(c: _Launch, q, k, v, out, grad_out, lse):
    """The backward's pre-pass: (delta (N, Hq, L), lse_split (N, Hq, 2, L)) float32, what every backward
    kernel reads in place of the forward's lse: P = exp(s - base - rest) with base = lse_split[..., 0, :],
    rest = lse_split[..., 1, :] in the kernels' units (_bwd_probs; see SPLIT_LSE), dS = P (dP - delta)."""
    n, hq, l = lse.shape
    delta = torch.empty((n, hq, l), dtype=torch.float32, device=q.device)
    lse_split = torch.empty((n, hq, 2, l), dtype=torch.float32, device=q.device)
    t = c.tile("bwd_delta")
    ms = c.mstrides
    _attn_bwd_delta_kernel[(triton.cdiv(l, t.block_m) * n * hq,)](
        out, grad_out, lse, delta, lse_split, q, k, v, c.mask, c.kpm, c.kv_range, c.seed, c.dropout_p,
        c.qk_scale, ms[0], ms[1], ms[2], ms[3], **c.dims, **c.flags_for(t), BLOCK_M=t.block_m, SPLIT_N=SPLIT_N, num_warps=t.num_warps, num_stages=t.num_stages)
    return delta, lse_split


def attention_backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p: float,
                       is_causal: bool, scale: float, seed):
    """Fused attention backward: returns dq, dk, dv shaped like q, k, v (dk/dv summed over each GQA
    group's query heads), deterministic (no atomics). Arguments as attention_forward's, plus
    grad_out (N, Hq, L, Ev), out and lse (N, Hq, L) float32 from the forward."""
    from . import attention_small  # small problems: one launch (FASTATTN_TRITON_SMALL=0: never)
    res = attention_small.backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal,
                                   scale, seed)
    if res is not None:
        return res
    n, hq, l, _ = q.shape
    ev = v.shape[3]
    assert tuple(grad_out.shape) == tuple(out.shape) == (n, hq, l, ev) and lse.dtype == torch.float32
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    with _device_of(q):
        c = _Launch(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed)
        ms = c.mstrides
        delta, lse_split = backward_prepass(c, q, k, v, out, grad_out, lse)
        t = c.tile("bwd_dkdv")
        _attn_bwd_dkdv_kernel[(triton.cdiv(c.s, t.block_n) * n * c.hkv,)](
            q, k, v, grad_out, lse_split, delta, dk, dv, c.mask, c.kpm, c.seed, c.dropout_p, c.qk_scale, c.scale,
            ms[0], ms[1], ms[2], ms[3], **c.dims, **c.flags_for(t), **t.kwargs,
            num_warps=t.num_warps, num_stages=t.num_stages)
        t = c.tile("bwd_dq")
        _attn_bwd_dq_kernel[(triton.cdiv(l, t.block_m) * n * hq,)](
            q, k, v, grad_out, lse_split, delta, dq, c.mask, c.kpm, c.kv_range, c.seed, c.dropout_p, c.qk_scale,
            c.scale, ms[0], ms[1], ms[2], ms[3], **c.dims, **c.flags_for(t), **t.kwargs,
            num_warps=t.num_warps, num_stages=t.num_stages)
    return dq, dk, dv
