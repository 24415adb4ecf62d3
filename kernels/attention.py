"""Fused attention in Triton: forward (online softmax) and backward (delta pre-pass, dK/dV, dQ).

Three layers, as everywhere in fastattn:
  * ``_attn_fwd_kernel``, ``_attn_bwd_delta_kernel``, ``_attn_bwd_dkdv_kernel``,
    ``_attn_bwd_dq_kernel``: the Triton programs;
  * ``attention_forward`` / ``attention_backward``: host launchers (allocate, pick a config, launch);
  * the op registration (torch.ops.fastattn.triton_attention_fwd/_bwd) lives in fastattn/ops.py.

What the launchers receive is fixed by fastattn/backends/README.md:
  q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev) contiguous, one dtype; query head h reads
  kv head h // (Hq // Hkv). attn_mask: None or an additive (N, Hq, L, S) view read through its
  strides (strides may be 0). key_padding_mask: None or bool (N, S), True = key ignored.
  seed: None or an int64 CPU tensor (1,); element (b, h, i, j) is kept iff
  tl.rand(seed, ((b*Hq + h)*L + i)*S + j) >= dropout_p. lse is the natural-log row log-sum-exp in
  float32, +inf for a row that sees no key (its output is 0 and its gradients are 0).

Design notes:
  * Scores are computed in the log2 domain: s2 = (q.k) * scale * log2(e) + mask * log2(e), so the
    softmax uses exp2; lse is converted back to the natural log when stored.
  * attn_mask, key padding and dropout are compile-time flags (HAS_MASK, HAS_KPM, HAS_DROPOUT), so
    the plain call compiles none of their code. Causality is a runtime bool argument (`causal`): it
    moves loop bounds, reverses the program order and adds one compare to the element test of the
    boundary blocks, and the inner loop over whole blocks never tests it, so it costs a causal or
    non-causal call nothing measurable and halves the specialisations to compile (8, not 16). Key
    blocks that need no boundary/causal test run in a loop without any element mask; only the last
    (or diagonal) blocks take the masked loop.
  * Causal: key blocks wholly above the diagonal are never visited. Key padding: the forward and dQ
    visit only the key range [first unpadded, last unpadded] of each batch (computed by the
    launcher); the dK/dV kernel skips a key block that is wholly padded.
  * The backward is deterministic and uses no atomics: one program owns a K/V block and loops over
    every query block of every query head of its GQA group; dQ is a separate kernel.
  * Head dims 1..256 are padded to a power of two (at least 32: 1..16 share the 32 bucket, see
    head_dim_bucket) and masked; L and S are arbitrary (boundary masks).
  * fp32 inputs use input_precision="ieee" (true fp32) unless
    torch.backends.cuda.matmul.allow_tf32 is set, then "tf32".
  * Block sizes, warps and stages come from the tables below, keyed on (dtype class, head-dim
    bucket, sequence-length bucket, specialisation); on a GPU the fastest candidate is measured once per key and
    cached. Under TRITON_INTERPRET=1 a single small config is used. Nothing here touches a GPU at
    import time.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once at import: under the interpreter the kernels run on CPU tensors with one small config.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

LOG2E = 1.4426950408889634


# ==================================================================================================
# Triton programs
# ==================================================================================================
# The interpreter of triton 3.9 multiplies bfloat16 tl.dot operands wrongly (it reads them as raw
# bits); under the interpreter only, bf16 operands are widened to fp32 as they are loaded. Compiled
# kernels never take that branch (a compile-time constant). (A helper function would cost the
# interpreter a re-patch of triton.language per call, so the test is written inline.)
_WIDEN_BF16 = tl.constexpr(INTERPRET)


# Integer arguments whose value the JIT must not specialise on. Triton compiles a sibling kernel
# when an int argument equals 1 or is a multiple of 16; for these (GQA group, head count, the batch
# and head strides of the mask, the Philox seed) that buys no better code, but GROUP == 1 (no GQA,
# the common case) would otherwise launch a kernel the ahead-of-time check never compiled. With
# them unspecialised, the launched kernel is the one tests/test_triton_aot_attention.py compiles
# (those arguments are plain i32/i64 there too).
_NO_SPECIALIZE = ["seed", "stride_mb", "stride_mh", "Hq", "GROUP"]


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_rows, kpm_base, drop_rows,
               start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
               L, S, HEAD_D, HEAD_DV, stride_ms,
               causal, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
               HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               INPUT_PRECISION: tl.constexpr):
    """One key block of the forward's online softmax. acc (BM, BDV) f32, l_i/m_i (BM,) f32 (log2 units)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    k_ptrs = k_base + offs_n[:, None] * HEAD_D + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * HEAD_DV + offs_dv[None, :]
    if BOUNDARY:
        k = tl.load(k_ptrs, mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)      # (BN, BD)
    else:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    if _WIDEN_BF16 and k.dtype == tl.bfloat16:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale       # (BM, BN) log2 units
    if HAS_MASK:
        # natural-log units (a mask of -3e38 is a score: times log2(e) it would overflow to -inf);
        # only -inf excludes a key, and it is set, not added (a NaN score + -inf would be NaN)
        mvals = tl.load(mask_rows[:, None] + offs_n[None, :].to(tl.int64) * stride_ms,
                        mask=(offs_m[:, None] < L) & n_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(mvals == float("-inf"), float("-inf"), s * 0.6931471805599453 + mvals)
    if HAS_KPM:
        pad = tl.load(kpm_base + offs_n, mask=n_ok, other=1)                      # (BN,) u8, 1 = ignore
        s = tl.where(pad[None, :] == 0, s, float("-inf"))
    if BOUNDARY:
        # Causal: key j is visible to row i iff j <= i. n_diag is 0 (every row sees it) otherwise.
        n_diag = tl.where(causal, offs_n, 0)
        visible = n_ok[None, :] & (n_diag[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only -inf so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    if HAS_MASK:  # natural-log units
        p = tl.math.exp2((s - m_sub[:, None]) * 1.4426950408889634)
        alpha = tl.math.exp2((m_i - m_sub) * 1.4426950408889634)
    else:
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        # The normaliser l_i sums every probability; only the kept ones reach the output.
        keep = tl.rand(seed, drop_rows[:, None] + offs_n[None, :]) >= dropout_p
        p = tl.where(keep, p, 0.0)
    if BOUNDARY:
        v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)  # (BN, BDV)
    else:
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
    if _WIDEN_BF16 and v.dtype == tl.bfloat16:
        v = v.to(tl.float32)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V, Out, Lse,        # q (N,Hq,L,E), k (N,Hkv,S,E), v (N,Hkv,S,Ev), out (N,Hq,L,Ev), lse (N,Hq,L) f32
    Mask, Kpm, KvRange,       # mask: additive (N,Hq,L,S) strided view; kpm (N,S) u8; kv_range (N,2) i32
    seed, dropout_p, qk_scale,  # philox seed (i64), dropout prob, scale*log2(e)
    stride_mb, stride_mh, stride_ml, stride_ms,  # mask strides (elements, may be 0)
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,  # GROUP = Hq // Hkv
    causal,                   # bool (a runtime flag: it only moves loop bounds and the boundary test)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    pid_m = pid % num_m
    pid_m = tl.where(causal, num_m - 1 - pid_m, pid_m)  # causal: the longest rows first (tail balance)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    Hkv = Hq // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L

    q_base = Q + bh.to(tl.int64) * L * HEAD_D
    k_base = K + (b * Hkv + hk).to(tl.int64) * S * HEAD_D
    v_base = V + (b * Hkv + hk).to(tl.int64) * S * HEAD_DV
    q = tl.load(q_base + offs_m[:, None] * HEAD_D + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)       # (BM, BD)
    if _WIDEN_BF16 and q.dtype == tl.bfloat16:
        q = q.to(tl.float32)

    mask_rows = Mask
    if HAS_MASK:
        mask_rows = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                     + offs_m.to(tl.int64) * stride_ml)                           # (BM,) pointers
    kpm_base = Kpm + b.to(tl.int64) * S
    drop_rows = (bh.to(tl.int64) * L + offs_m) * S                                 # (BM,) i64

    # Key range to visit: [lo, n_end). Blocks below full_end need no boundary/causal test.
    n_end = tl.where(causal, tl.minimum(S, start_m + BLOCK_M), S)
    lo = 0
    if HAS_KPM:
        kv_lo = tl.load(KvRange + 2 * b)
        kv_hi = tl.load(KvRange + 2 * b + 1)
        lo = (kv_lo // BLOCK_N) * BLOCK_N
        n_end = tl.minimum(n_end, kv_hi)
    full_end = tl.where(causal, tl.minimum(n_end, start_m + 1), n_end)
    full_end = tl.maximum((full_end // BLOCK_N) * BLOCK_N, lo)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_rows, kpm_base, drop_rows,
                                   start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                   L, S, HEAD_D, HEAD_DV, stride_ms,
                                   causal, BLOCK_N, False, HAS_MASK, HAS_KPM, HAS_DROPOUT,
                                   INPUT_PRECISION)
    for start_n in range(full_end, n_end, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_rows, kpm_base, drop_rows,
                                   start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                   L, S, HEAD_D, HEAD_DV, stride_ms,
                                   causal, BLOCK_N, True, HAS_MASK, HAS_KPM, HAS_DROPOUT,
                                   INPUT_PRECISION)

    seen = l_i != 0.0  # a row that saw no key (a NaN sum is seen: NaN propagates)
    inv_l = 1.0 / tl.where(seen, l_i, 1.0)
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    o_base = Out + bh.to(tl.int64) * L * HEAD_DV
    tl.store(o_base + offs_m[:, None] * HEAD_DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
    if HAS_MASK:  # m_i in natural-log units
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)) * 0.6931471805599453, float("inf"))
    else:
        lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("inf"))
    tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_delta_kernel(
    Out, DOut, Delta,         # out (N,Hq,L,Ev), grad_out (N,Hq,L,Ev), delta (N,Hq,L) f32
    Q, K, V, Lse, LseBase, LseRest,  # q, k, v; lse (N,Hq,L) f32 from the forward; the split (N,Hq,L) f32 outputs
    Mask, Kpm, KvRange, dropout_p, qk_scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """delta[b,h,i] = sum_e dO[b,h,i,e] * O[b,h,i,e] in float32, and the log-sum-exp the dK/dV and dQ
    kernels recompute P from, as base + rest in their units (log2 units; natural-log units with a
    mask): P = exp2(s - base - rest). Normally base = lse, rest = 0. The float32 lse is one number
    m + log l rounded to the ulp of m: where |lse| >= 32 it would get P wrong by up to ulp(lse)/2
    relative (or by a factor S when log l vanishes against m = -1e30), so those rows recompute the
    row max m (base) and log l (rest) over their keys, kept apart. Those rows (large logits) also
    take delta = rowsum(P dP) with P unrounded and dP = dO V^T by the dQ kernel's own product, as
    torch's math does: rowsum(dO O) from the output rounded to 16 bits is off by about 2^-9 |dO| |O|,
    and any rounding apart from dP's, which dS = P (dP - delta) carries into dQ and dK times the
    logit scale, is what a one-hot row's exact dS = 0 is made of."""
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
    delta = tl.sum(o * do, 1)

    lse = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    big = (tl.abs(lse) >= 32.0) & (lse != float("inf")) & m_ok
    if HAS_MASK:
        lse_base = lse
    else:
        lse_base = lse * 1.4426950408889634
    lse_rest = tl.zeros([BLOCK_M], tl.float32)
    if tl.max(big.to(tl.int32), 0) > 0:  # rare: recompute the row max and sum (as _fwd_block does)
        b = bh // Hq
        h = bh % Hq
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + bh.to(tl.int64) * L * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        if _WIDEN_BF16 and q.dtype == tl.bfloat16:
            q = q.to(tl.float32)
        k_base = K + (b * (Hq // GROUP) + h // GROUP).to(tl.int64) * S * HEAD_D
        mask_rows = Mask
        if HAS_MASK:
            mask_rows = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                         + offs_m.to(tl.int64) * stride_ml)
        v_base = V + (b * (Hq // GROUP) + h // GROUP).to(tl.int64) * S * HEAD_DV
        do_in = tl.load(DOut + base + ptrs, mask=ok, other=0.0)  # in its dtype, as the dQ kernel reads it
        if _WIDEN_BF16 and do_in.dtype == tl.bfloat16:
            do_in = do_in.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        dd = tl.zeros([BLOCK_M], tl.float32)  # rowsum(P dP), rescaled like l_i
        n_end = tl.where(causal, tl.minimum(S, start_m + BLOCK_M), S)
        lo = 0
        if HAS_KPM:
            lo = (tl.load(KvRange + 2 * b) // BLOCK_N) * BLOCK_N
            n_end = tl.minimum(n_end, tl.load(KvRange + 2 * b + 1))
        for start_n in range(lo, n_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < S
            k = tl.load(k_base + offs_n[:, None] * HEAD_D + offs_d[None, :],
                        mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
            if _WIDEN_BF16 and k.dtype == tl.bfloat16:
                k = k.to(tl.float32)
            sc = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            if HAS_MASK:
                mvals = tl.load(mask_rows[:, None] + offs_n[None, :].to(tl.int64) * stride_ms,
                                mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
                sc = tl.where(mvals == float("-inf"), float("-inf"), sc * 0.6931471805599453 + mvals)
            if HAS_KPM:
                pad = tl.load(Kpm + b.to(tl.int64) * S + offs_n, mask=n_ok, other=1)
                sc = tl.where(pad[None, :] == 0, sc, float("-inf"))
            n_diag = tl.where(causal, offs_n, 0)
            sc = tl.where(n_ok[None, :] & (n_diag[None, :] <= offs_m[:, None]), sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
            if HAS_MASK:
                alpha = tl.math.exp2((m_i - m_sub) * 1.4426950408889634)
                pr = tl.math.exp2((sc - m_sub[:, None]) * 1.4426950408889634)
            else:
                alpha = tl.math.exp2(m_i - m_sub)
                pr = tl.math.exp2(sc - m_sub[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)
            m_i = m_new
            v = tl.load(v_base + offs_n[:, None] * HEAD_DV + offs_dv[None, :],
                        mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
            if _WIDEN_BF16 and v.dtype == tl.bfloat16:
                v = v.to(tl.float32)
            dp = tl.dot(do_in, tl.trans(v), input_precision=INPUT_PRECISION)
            dd = dd * alpha + tl.sum(pr * dp, 1)
        split = big & (l_i != 0.0)
        if HAS_MASK:
            rest = tl.math.log2(tl.where(split, l_i, 1.0)) * 0.6931471805599453
        else:
            rest = tl.math.log2(tl.where(split, l_i, 1.0))
        lse_base = tl.where(split, m_i, lse_base)
        lse_rest = tl.where(split, rest, 0.0)
        # (with dropout delta is rowsum(P Z dP) / (1 - p): keep rowsum(dO O) there)
        delta = tl.where(split & (dropout_p == 0.0), dd / tl.where(split, l_i, 1.0), delta)
    tl.store(Delta + bh.to(tl.int64) * L + offs_m, delta, mask=m_ok)
    tl.store(LseBase + bh.to(tl.int64) * L + offs_m, lse_base, mask=m_ok)
    tl.store(LseRest + bh.to(tl.int64) * L + offs_m, lse_rest, mask=m_ok)


@triton.jit
def _dkdv_block(dk, dv, k, v, key_ok, q_base, do_base, lse_base, rest_base, delta_base, mask_cols, drop_base,
                start_m, offs_n, offs_d, offs_dv, seed, dropout_p, qk_scale,
                L, S, HEAD_D, HEAD_DV, stride_ml,
                causal, BLOCK_M: tl.constexpr, BOUNDARY: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """One query block's contribution to a resident K/V block, transposed: (BN, BM) tiles."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    q_ptrs = q_base + offs_m[:, None] * HEAD_D + offs_d[None, :]
    do_ptrs = do_base + offs_m[:, None] * HEAD_DV + offs_dv[None, :]
    if BOUNDARY:
        q = tl.load(q_ptrs, mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)      # (BM, BD)
        do = tl.load(do_ptrs, mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)  # (BM, BDV)
    else:
        q = tl.load(q_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
        do = tl.load(do_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
    if _WIDEN_BF16 and q.dtype == tl.bfloat16:
        q = q.to(tl.float32)
    if _WIDEN_BF16 and do.dtype == tl.bfloat16:
        do = do.to(tl.float32)
    lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))   # base and rest: see the delta pre-pass
    rest = tl.load(rest_base + offs_m, mask=m_ok, other=0.0)
    sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale      # (BN, BM)
    if HAS_MASK:  # natural-log units, as in _fwd_block
        mvals = tl.load(mask_cols[:, None] + offs_m[None, :].to(tl.int64) * stride_ml,
                        mask=(offs_n[:, None] < S) & m_ok[None, :], other=0.0).to(tl.float32)
        sT = tl.where(mvals == float("-inf"), float("-inf"), sT * 0.6931471805599453 + mvals)
        pT = tl.math.exp2(((sT - lse[None, :]) - rest[None, :]) * 1.4426950408889634)
    else:
        pT = tl.math.exp2((sT - lse[None, :]) - rest[None, :])
    if HAS_KPM:
        pT = tl.where(key_ok[:, None], pT, 0.0)
    if BOUNDARY:
        n_diag = tl.where(causal, offs_n, 0)  # as in _fwd_block
        visible = (offs_n[:, None] < S) & m_ok[None, :] & (n_diag[:, None] <= offs_m[None, :])
        pT = tl.where(visible, pT, 0.0)
    dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)               # (BN, BM)
    if HAS_DROPOUT:
        keep = tl.rand(seed, drop_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None]) >= dropout_p
        pT_kept = tl.where(keep, pT, 0.0)  # the 1/(1-p) scale is applied to dv once, at the end
        dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
    else:
        pT_kept = pT
    dv = tl.dot(pT_kept.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, LseRest, Delta,  # q (N,Hq,L,E), k (N,Hkv,S,E), v (N,Hkv,S,Ev), dO (N,Hq,L,Ev),
                                         # lse base/rest (the delta pre-pass's split), delta (N,Hq,L)
    DK, DV,                     # dk (N,Hkv,S,E), dv (N,Hkv,S,Ev)
    Mask, Kpm,                  # additive (N,Hq,L,S) strided view; (N,S) u8
    seed, dropout_p, qk_scale, sm_scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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

    k = tl.load(K + bhk.to(tl.int64) * S * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :],
                mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)       # (BN, BD)
    v = tl.load(V + bhk.to(tl.int64) * S * HEAD_DV + offs_n[:, None] * HEAD_DV + offs_dv[None, :],
                mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)     # (BN, BDV)
    if _WIDEN_BF16 and k.dtype == tl.bfloat16:
        k = k.to(tl.float32)
    if _WIDEN_BF16 and v.dtype == tl.bfloat16:
        v = v.to(tl.float32)

    # Query blocks to visit: [m_lo, m_end). Those in [f_lo, f_hi) need no boundary/causal test.
    m_end = tl.cdiv(L, BLOCK_M) * BLOCK_M
    m_lo = tl.where(causal, tl.minimum((start_n // BLOCK_M) * BLOCK_M, m_end), 0)
    f_lo = tl.where(causal, tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, 0)
    f_hi = (L // BLOCK_M) * BLOCK_M
    key_ok = n_ok
    if HAS_KPM:
        pad = tl.load(Kpm + b.to(tl.int64) * S + offs_n, mask=n_ok, other=1)
        key_ok = pad == 0
        # A key block that is wholly padded receives no gradient: visit nothing.
        m_lo = tl.where(tl.sum(key_ok.to(tl.int32), 0) > 0, m_lo, m_end)
    # The last key block (partly beyond S): every query block needs the key boundary test.
    f_lo = tl.where(start_n + BLOCK_N > S, m_end, f_lo)
    f_lo = tl.minimum(tl.maximum(f_lo, m_lo), m_end)
    f_hi = tl.maximum(f_hi, f_lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + bh.to(tl.int64) * L * HEAD_D
        do_base = DOut + bh.to(tl.int64) * L * HEAD_DV
        lse_base = Lse + bh.to(tl.int64) * L
        rest_base = LseRest + bh.to(tl.int64) * L
        delta_base = Delta + bh.to(tl.int64) * L
        mask_cols = Mask
        if HAS_MASK:
            mask_cols = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                         + offs_n.to(tl.int64) * stride_ms)                        # (BN,) pointers
        drop_base = bh.to(tl.int64) * L * S
        for start_m in range(m_lo, f_lo, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, key_ok, q_base, do_base, lse_base, rest_base, delta_base, mask_cols,
                                 drop_base, start_m, offs_n, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                 L, S, HEAD_D, HEAD_DV, stride_ml,
                                 causal, BLOCK_M, True, HAS_MASK, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION)
        for start_m in range(f_lo, f_hi, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, key_ok, q_base, do_base, lse_base, rest_base, delta_base, mask_cols,
                                 drop_base, start_m, offs_n, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                 L, S, HEAD_D, HEAD_DV, stride_ml,
                                 causal, BLOCK_M, False, HAS_MASK, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION)
        for start_m in range(f_hi, m_end, BLOCK_M):
            dk, dv = _dkdv_block(dk, dv, k, v, key_ok, q_base, do_base, lse_base, rest_base, delta_base, mask_cols,
                                 drop_base, start_m, offs_n, offs_d, offs_dv, seed, dropout_p, qk_scale,
                                 L, S, HEAD_D, HEAD_DV, stride_ml,
                                 causal, BLOCK_M, True, HAS_MASK, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION)

    if HAS_DROPOUT:
        dv = dv / (1.0 - dropout_p)
    dk = dk * sm_scale
    tl.store(DK + bhk.to(tl.int64) * S * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(DV + bhk.to(tl.int64) * S * HEAD_DV + offs_n[:, None] * HEAD_DV + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


@triton.jit
def _dq_block(dq, q, do, lse2, rest, delta, k_base, v_base, mask_rows, kpm_base, drop_rows,
              start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
              L, S, HEAD_D, HEAD_DV, stride_ms,
              causal, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr,
              HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """One key block's contribution to a resident dQ block (BM, BD)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    k_ptrs = k_base + offs_n[:, None] * HEAD_D + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * HEAD_DV + offs_dv[None, :]
    if BOUNDARY:
        k = tl.load(k_ptrs, mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)      # (BN, BD)
    else:
        k = tl.load(k_ptrs, mask=offs_d[None, :] < HEAD_D, other=0.0)
    if BOUNDARY:
        v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)  # (BN, BDV)
    else:
        v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
    if _WIDEN_BF16 and k.dtype == tl.bfloat16:
        k = k.to(tl.float32)
    if _WIDEN_BF16 and v.dtype == tl.bfloat16:
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale       # (BM, BN)
    if HAS_MASK:  # natural-log units, as in _fwd_block (lse2 is then the natural-log lse)
        mvals = tl.load(mask_rows[:, None] + offs_n[None, :].to(tl.int64) * stride_ms,
                        mask=(offs_m[:, None] < L) & n_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(mvals == float("-inf"), float("-inf"), s * 0.6931471805599453 + mvals)
        p = tl.math.exp2(((s - lse2[:, None]) - rest[:, None]) * 1.4426950408889634)
    else:
        p = tl.math.exp2((s - lse2[:, None]) - rest[:, None])
    if HAS_KPM:
        pad = tl.load(kpm_base + offs_n, mask=n_ok, other=1)
        p = tl.where(pad[None, :] == 0, p, 0.0)
    if BOUNDARY:
        n_diag = tl.where(causal, offs_n, 0)  # as in _fwd_block
        visible = n_ok[None, :] & (n_diag[None, :] <= offs_m[:, None])
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)                # (BM, BN)
    if HAS_DROPOUT:
        keep = tl.rand(seed, drop_rows[:, None] + offs_n[None, :]) >= dropout_p
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, LseRest, Delta,  # as in _attn_bwd_dkdv_kernel
    DQ,                         # dq (N,Hq,L,E)
    Mask, Kpm, KvRange,
    seed, dropout_p, qk_scale, sm_scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    num_m = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    pid_m = pid % num_m
    pid_m = tl.where(causal, num_m - 1 - pid_m, pid_m)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    Hkv = Hq // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < L

    q = tl.load(Q + bh.to(tl.int64) * L * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
                mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)       # (BM, BD)
    do = tl.load(DOut + bh.to(tl.int64) * L * HEAD_DV + offs_m[:, None] * HEAD_DV + offs_dv[None, :],
                 mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)    # (BM, BDV)
    if _WIDEN_BF16 and q.dtype == tl.bfloat16:
        q = q.to(tl.float32)
    if _WIDEN_BF16 and do.dtype == tl.bfloat16:
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=float("inf"))  # base, in the
    rest = tl.load(LseRest + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)      # blocks' units
    delta = tl.load(Delta + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    k_base = K + (b * Hkv + hk).to(tl.int64) * S * HEAD_D
    v_base = V + (b * Hkv + hk).to(tl.int64) * S * HEAD_DV
    mask_rows = Mask
    if HAS_MASK:
        mask_rows = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                     + offs_m.to(tl.int64) * stride_ml)
    kpm_base = Kpm + b.to(tl.int64) * S
    drop_rows = (bh.to(tl.int64) * L + offs_m) * S

    n_end = tl.where(causal, tl.minimum(S, start_m + BLOCK_M), S)
    lo = 0
    if HAS_KPM:
        kv_lo = tl.load(KvRange + 2 * b)
        kv_hi = tl.load(KvRange + 2 * b + 1)
        lo = (kv_lo // BLOCK_N) * BLOCK_N
        n_end = tl.minimum(n_end, kv_hi)
    full_end = tl.where(causal, tl.minimum(n_end, start_m + 1), n_end)
    full_end = tl.maximum((full_end // BLOCK_N) * BLOCK_N, lo)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(lo, full_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, rest, delta, k_base, v_base, mask_rows, kpm_base, drop_rows,
                       start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                       L, S, HEAD_D, HEAD_DV, stride_ms,
                       causal, BLOCK_N, False, HAS_MASK, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION)
    for start_n in range(full_end, n_end, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, rest, delta, k_base, v_base, mask_rows, kpm_base, drop_rows,
                       start_n, offs_m, offs_d, offs_dv, seed, dropout_p, qk_scale,
                       L, S, HEAD_D, HEAD_DV, stride_ms,
                       causal, BLOCK_N, True, HAS_MASK, HAS_KPM, HAS_DROPOUT, INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + bh.to(tl.int64) * L * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D))


# ==================================================================================================
# Configurations
# ==================================================================================================
ARCH_FAMILIES = (80, 90)  # sm_80..sm_89 (A100 class) and sm_90+ (H100 class)


def _cfg(block_m: int, block_n: int, num_warps: int, num_stages: int, archs=ARCH_FAMILIES) -> triton.Config:
    """A candidate config; `archs` names the families it is offered on (some compile without spills
    for only one of them)."""
    cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)
    cfg.archs = tuple(archs)
    return cfg


def config_archs(cfg: triton.Config) -> tuple:
    return getattr(cfg, "archs", ARCH_FAMILIES)


def arch_family(arch: int) -> int:
    return 90 if arch >= 90 else 80


HEAD_DIM_BUCKETS = (32, 64, 128, 256)  # padded head dim (a power of two, >= 32; see head_dim_bucket)
SEQ_BUCKETS = ("short", "long")            # max(L, S) <= SHORT_SEQ, else long
SHORT_SEQ = 512
DTYPE_CLASSES = ("f16", "f32", "tf32")     # fp16/bf16 | fp32 computed in fp32 | fp32 allowed tf32

# Candidate configs per (dtype class, head-dim bucket, seq bucket, specialisation); on a GPU the launcher
# measures the candidates of a key once and keeps the fastest. BLOCK_M is the query block, BLOCK_N
# the key block (for dK/dV: BLOCK_N keys stay resident while BLOCK_M query rows stream past).
# Variants: "plain" (no attn_mask, no dropout; key padding and causal cost little), "mask" (an
# attn_mask tile is loaded per block: its strided pointers and values cost registers, and a load
# through a runtime stride is prefetched in registers, not shared memory), "dropout" (a Philox draw
# of 10 rounds per score element): heavier variants get fewer score elements per thread.
# tests/test_triton_aot_attention.py compiles them for sm_80 and sm_90 and asserts no register
# spills and shared memory within the chip. Removed after that check (triton 3.9, ptxas 13.4):
#   fwd (128,128,w8,s3): 224 KB smem, over sm_80's 163 KB; fwd hd128 (128,64,w8,s3): spills on sm_80
#   (kpm+causal); fwd hd64 (128,64,w4,s3) and hd128 (64,64,w4,s3) with attn_mask: spill;
#   every dK/dV config with num_stages 3 (the pipeliner holds the prefetched q/dO tiles in registers:
#   255 registers and spills even in the plain case) and with 64 resident keys (spills with masks);
#   dropout configs with 32 score elements per thread; fp32 configs with 4 warps (spill with masks);
#   dQ hd128 (32,32,w8,s2) on sm_90 (causal+dropout: ptxas settles on 128 registers and spills 32 B,
#   while the heavier specialisations do not: lighter specialisations are not always cheaper).
# The full cross product (every dtype, bucket and specialisation; the earlier CI subset compiled only
# the heaviest specialisation of each group) found 101 more (kernel, dtype class, head dim,
# specialisation, arch) cases that spill 4..2300 B, mostly fp32 (ieee and tf32) at head dims 128 and
# 256 where ptxas stops at 128 or 255 registers. Each is replaced for that specialisation and arch
# only ("Per-specialisation replacements" below; the group config stays where it compiles clean):
#   fwd fp32 hd128/256 (32,32,w8): -> (16,32,w8,s2) or (32,16,w8,s2); fwd fp16 hd32 mask+dropout
#   (64,64,w8,s2), 255 registers and 48..104 B -> (64,32,w8,s2); dK/dV fp32/tf32 (16,32,w8,s1) ->
#   (16,16,w8,s1|s2), (32,16,w8,s1) or (16,16,w4,s1); dK/dV fp16 hd32/64 dropout (16,32,w4,s1) on
#   sm_90 -> (16,32,w8,s1); dQ fp32/tf32 (32,32,w8,s2) -> (16,32,w8,s2|s1) or (32,16,w8,s2); dQ
#   fp16 hd256 kpm+dropout on sm_90 -> (32,16,w8,s2). dK/dV hd256 mask+dropout (fp16 on sm_80, tf32
#   on both) spills with every config tried, so it runs as mask+kpm+dropout (SPEC_ALIAS).
# The table key's last element is the specialisation's name (see variant()); the groups below fill
# the specialisations of one weight class alike, and a specialisation that needs other configs gets
# its own _fill after its group's.
VARIANTS = ("plain", "kpm", "mask", "mask+kpm", "drop", "kpm+drop", "mask+drop", "mask+kpm+drop")
FWD_CONFIGS: dict[tuple[str, int, str, str], list[triton.Config]] = {}
BWD_DKDV_CONFIGS: dict[tuple[str, int, str, str], list[triton.Config]] = {}
BWD_DQ_CONFIGS: dict[tuple[str, int, str, str], list[triton.Config]] = {}


def _fill(table, dtype_classes, buckets, seqs, variants, configs):
    for dc in dtype_classes:
        for hd in buckets:
            for sq in seqs:
                for var in variants:
                    table[(dc, hd, sq, var)] = list(configs)


F16, F32 = ("f16",), ("f32", "tf32")
SHORT, LONG, ANY_SEQ = ("short",), ("long",), SEQ_BUCKETS
PLAIN, MASK, DROP = ("plain", "kpm"), ("mask", "mask+kpm"), ("drop", "kpm+drop", "mask+drop", "mask+kpm+drop")
ANY_VAR = VARIANTS
SMALL_HD = (32, 64)

# Forward.
_fill(FWD_CONFIGS, F16, SMALL_HD, SHORT, PLAIN, [_cfg(64, 64, 4, 3)])
_fill(FWD_CONFIGS, F16, (32,), LONG, PLAIN, [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 3)])
_fill(FWD_CONFIGS, F16, (64,), LONG, PLAIN, [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2)])
_fill(FWD_CONFIGS, F16, (128,), SHORT, PLAIN, [_cfg(64, 64, 8, 3)])
_fill(FWD_CONFIGS, F16, (128,), LONG, PLAIN, [_cfg(128, 32, 8, 3), _cfg(64, 64, 8, 3), _cfg(128, 64, 8, 3, (90,))])
_fill(FWD_CONFIGS, F16, SMALL_HD, ANY_SEQ, MASK + DROP, [_cfg(64, 64, 8, 2)])
_fill(FWD_CONFIGS, F16, (128,), ANY_SEQ, MASK + DROP, [_cfg(64, 32, 8, 2)])
_fill(FWD_CONFIGS, F16, (256,), ANY_SEQ, PLAIN, [_cfg(64, 32, 8, 2)])
_fill(FWD_CONFIGS, F16, (256,), ANY_SEQ, MASK + DROP, [_cfg(32, 32, 8, 2)])
_fill(FWD_CONFIGS, ("f32",), SMALL_HD, ANY_SEQ, PLAIN + DROP, [_cfg(16, 32, 4, 2)])
_fill(FWD_CONFIGS, ("f32",), SMALL_HD, ANY_SEQ, MASK, [_cfg(32, 32, 8, 1)])
_fill(FWD_CONFIGS, ("tf32",), SMALL_HD, ANY_SEQ, ANY_VAR, [_cfg(32, 32, 8, 2)])
_fill(FWD_CONFIGS, F32, (128,), ANY_SEQ, ANY_VAR, [_cfg(32, 32, 8, 2)])
_fill(FWD_CONFIGS, F32, (256,), ANY_SEQ, ANY_VAR, [_cfg(32, 32, 8, 1)])
# Per-specialisation replacements (the full AOT sweep, triton 3.9 / ptxas 13.x): the group config
# above spills for these (dtype class, head dim, specialisation) on the arch it is not offered on.
_fill(FWD_CONFIGS, ("f16",), (32,), ANY_SEQ, ("mask+drop", "mask+kpm+drop"), [_cfg(64, 32, 8, 2)])
_fill(FWD_CONFIGS, ("f32",), (32,), ANY_SEQ, ("mask+kpm+drop",), [_cfg(16, 32, 4, 2, (80,)), _cfg(16, 32, 8, 2, (90,))])
_fill(FWD_CONFIGS, ("f32",), (128,), ANY_SEQ, ("drop", "kpm+drop"), [_cfg(16, 32, 8, 2)])
_fill(FWD_CONFIGS, ("f32",), (128,), ANY_SEQ, ("mask", "mask+drop", "mask+kpm", "mask+kpm+drop", "plain"), [_cfg(32, 32, 8, 2, (80,)), _cfg(16, 32, 8, 2, (90,))])
_fill(FWD_CONFIGS, ("f32",), (256,), ANY_SEQ, ("drop",), [_cfg(32, 16, 8, 2)])
_fill(FWD_CONFIGS, ("f32",), (256,), ANY_SEQ, ("kpm", "mask+drop", "mask+kpm+drop", "plain"), [_cfg(16, 32, 8, 2)])
_fill(FWD_CONFIGS, ("f32",), (256,), ANY_SEQ, ("kpm+drop", "mask", "mask+kpm"), [_cfg(32, 16, 8, 2, (80,)), _cfg(16, 32, 8, 2, (90,))])
_fill(FWD_CONFIGS, ("tf32",), (64,), ANY_SEQ, ("mask+kpm",), [_cfg(32, 32, 8, 2, (90,)), _cfg(16, 32, 8, 2, (80,))])
_fill(FWD_CONFIGS, ("tf32",), (256,), ANY_SEQ, ("plain",), [_cfg(32, 32, 8, 1, (90,)), _cfg(16, 32, 8, 2, (80,))])

# dK/dV: num_stages 1 (see above), 32 resident keys.
_fill(BWD_DKDV_CONFIGS, F16, SMALL_HD, ANY_SEQ, PLAIN, [_cfg(16, 32, 8, 1)])
_fill(BWD_DKDV_CONFIGS, F16, SMALL_HD, ANY_SEQ, MASK, [_cfg(32, 32, 4, 1), _cfg(32, 64, 4, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, F16, SMALL_HD, ANY_SEQ, DROP, [_cfg(16, 32, 4, 1)])
_fill(BWD_DKDV_CONFIGS, F16, (128,), ANY_SEQ, PLAIN + MASK, [_cfg(32, 32, 8, 1)])
_fill(BWD_DKDV_CONFIGS, F16, (128,), ANY_SEQ, DROP, [_cfg(16, 32, 8, 1)])
_fill(BWD_DKDV_CONFIGS, F16, (256,), ANY_SEQ, PLAIN + MASK, [_cfg(16, 32, 8, 1)])
_fill(BWD_DKDV_CONFIGS, F16, (256,), ANY_SEQ, DROP, [_cfg(16, 16, 8, 1)])
_fill(BWD_DKDV_CONFIGS, F32, SMALL_HD, ANY_SEQ, ANY_VAR, [_cfg(16, 32, 8, 1)])
_fill(BWD_DKDV_CONFIGS, ("f32",), SMALL_HD, ANY_SEQ, DROP, [_cfg(32, 32, 8, 1, (80,)), _cfg(16, 32, 8, 2, (90,))])
_fill(BWD_DKDV_CONFIGS, F32, (128, 256), ANY_SEQ, ANY_VAR, [_cfg(16, 32, 8, 1)])
# Per-specialisation replacements (the full AOT sweep, triton 3.9 / ptxas 13.x): the group config
# above spills for these (dtype class, head dim, specialisation) on the arch it is not offered on.
_fill(BWD_DKDV_CONFIGS, ("f16",), (32,), ANY_SEQ, ("drop",), [_cfg(16, 32, 4, 1, (80,)), _cfg(16, 32, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f16",), (32,), ANY_SEQ, ("mask+kpm",), [_cfg(32, 32, 4, 1, (90,)), _cfg(32, 64, 4, 1, (90,)), _cfg(16, 32, 8, 1, (80,))])
_fill(BWD_DKDV_CONFIGS, ("f16",), (64,), ANY_SEQ, ("drop", "kpm+drop"), [_cfg(16, 32, 4, 1, (80,)), _cfg(16, 32, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f16",), (256,), ANY_SEQ, ("mask",), [_cfg(16, 32, 8, 1, (80,)), _cfg(16, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (32,), ANY_SEQ, ("drop",), [_cfg(16, 16, 4, 1, (80,)), _cfg(32, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (32,), ANY_SEQ, ("kpm",), [_cfg(16, 32, 8, 1, (80,)), _cfg(16, 16, 4, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (32,), ANY_SEQ, ("kpm+drop",), [_cfg(16, 16, 8, 2, (80,)), _cfg(16, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (32,), ANY_SEQ, ("mask",), [_cfg(16, 32, 8, 1, (80,)), _cfg(32, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (32,), ANY_SEQ, ("mask+kpm",), [_cfg(16, 32, 8, 1, (80,)), _cfg(16, 16, 8, 2, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (32,), ANY_SEQ, ("plain",), [_cfg(16, 32, 8, 1, (80,)), _cfg(16, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (64,), ANY_SEQ, ("drop",), [_cfg(16, 32, 8, 2, (90,)), _cfg(16, 16, 8, 1, (80,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (64,), ANY_SEQ, ("kpm+drop",), [_cfg(16, 16, 8, 1, (80,)), _cfg(32, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (128,), ANY_SEQ, ("drop",), [_cfg(16, 16, 8, 2, (80,)), _cfg(16, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (128,), ANY_SEQ, ("kpm", "plain"), [_cfg(16, 32, 8, 1, (90,)), _cfg(16, 16, 8, 1, (80,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (128,), ANY_SEQ, ("kpm+drop",), [_cfg(16, 16, 8, 1)])
_fill(BWD_DKDV_CONFIGS, ("f32",), (128,), ANY_SEQ, ("mask", "mask+kpm"), [_cfg(16, 16, 8, 1, (80,)), _cfg(32, 16, 8, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (256,), ANY_SEQ, ("drop", "kpm", "kpm+drop", "plain"), [_cfg(16, 32, 8, 1, (90,)), _cfg(16, 16, 8, 1, (80,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (256,), ANY_SEQ, ("mask+drop",), [_cfg(16, 16, 8, 1, (80,)), _cfg(16, 16, 4, 1, (90,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (256,), ANY_SEQ, ("mask+kpm",), [_cfg(16, 32, 8, 1, (90,)), _cfg(32, 16, 8, 1, (80,))])
_fill(BWD_DKDV_CONFIGS, ("f32",), (256,), ANY_SEQ, ("mask+kpm+drop",), [_cfg(16, 16, 8, 1, (80,)), _cfg(16, 16, 8, 2, (90,))])
_fill(BWD_DKDV_CONFIGS, ("tf32",), (128,), ANY_SEQ, ("mask+drop",), [_cfg(16, 32, 8, 1, (90,)), _cfg(16, 16, 8, 1, (80,))])
_fill(BWD_DKDV_CONFIGS, ("tf32",), (128,), ANY_SEQ, ("mask+kpm+drop",), [_cfg(16, 16, 8, 1)])
_fill(BWD_DKDV_CONFIGS, ("tf32",), (256,), ANY_SEQ, ("drop", "kpm", "mask+kpm"), [_cfg(16, 32, 8, 1, (90,)), _cfg(16, 16, 8, 1, (80,))])
_fill(BWD_DKDV_CONFIGS, ("tf32",), (256,), ANY_SEQ, ("kpm+drop", "mask", "mask+kpm+drop"), [_cfg(16, 16, 8, 1)])

# dQ.
_fill(BWD_DQ_CONFIGS, F16, SMALL_HD, ANY_SEQ, PLAIN, [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)])
_fill(BWD_DQ_CONFIGS, F16, SMALL_HD, ANY_SEQ, MASK + DROP, [_cfg(32, 32, 4, 2)])
_fill(BWD_DQ_CONFIGS, F16, (128,), ANY_SEQ, PLAIN + MASK, [_cfg(64, 32, 8, 2)])
_fill(BWD_DQ_CONFIGS, F16, (128,), ANY_SEQ, DROP, [_cfg(32, 32, 8, 2, (80,)), _cfg(32, 32, 8, 1, (90,))])
_fill(BWD_DQ_CONFIGS, F16, (256,), ANY_SEQ, DROP, [_cfg(32, 32, 8, 2)])
_fill(BWD_DQ_CONFIGS, F16, (256,), ANY_SEQ, PLAIN + MASK, [_cfg(32, 32, 8, 2)])
_fill(BWD_DQ_CONFIGS, F32, SMALL_HD, ANY_SEQ, ANY_VAR, [_cfg(32, 32, 8, 2)])
_fill(BWD_DQ_CONFIGS, F32, (128,), ANY_SEQ, ANY_VAR, [_cfg(32, 32, 8, 2)])
_fill(BWD_DQ_CONFIGS, F32, (256,), ANY_SEQ, ANY_VAR, [_cfg(16, 32, 8, 1)])
# Per-specialisation replacements (the full AOT sweep, triton 3.9 / ptxas 13.x): the group config
# above spills for these (dtype class, head dim, specialisation) on the arch it is not offered on.
_fill(BWD_DQ_CONFIGS, ("f16",), (32,), ANY_SEQ, ("kpm+drop",), [_cfg(32, 32, 4, 2, (80,)), _cfg(32, 32, 8, 2, (90,))])
_fill(BWD_DQ_CONFIGS, ("f16",), (256,), ANY_SEQ, ("kpm+drop",), [_cfg(32, 32, 8, 2, (80,)), _cfg(32, 16, 8, 2, (90,))])
_fill(BWD_DQ_CONFIGS, ("f32",), (32,), ANY_SEQ, ("drop",), [_cfg(32, 32, 8, 2, (80,)), _cfg(16, 32, 8, 2, (90,))])
_fill(BWD_DQ_CONFIGS, ("f32",), (64,), ANY_SEQ, ("kpm+drop", "mask"), [_cfg(32, 32, 8, 2, (90,)), _cfg(16, 32, 8, 2, (80,))])
_fill(BWD_DQ_CONFIGS, ("f32",), (128,), ANY_SEQ, ("drop", "mask+drop"), [_cfg(32, 32, 8, 2, (90,)), _cfg(16, 32, 8, 2, (80,))])
_fill(BWD_DQ_CONFIGS, ("f32",), (128,), ANY_SEQ, ("mask", "plain"), [_cfg(32, 32, 8, 2, (80,)), _cfg(16, 32, 8, 2, (90,))])
_fill(BWD_DQ_CONFIGS, ("f32",), (128,), ANY_SEQ, ("mask+kpm",), [_cfg(32, 32, 8, 2, (80,)), _cfg(32, 16, 8, 2, (90,))])
_fill(BWD_DQ_CONFIGS, ("f32",), (128,), ANY_SEQ, ("mask+kpm+drop",), [_cfg(32, 32, 8, 2, (90,)), _cfg(16, 32, 8, 1, (80,))])
_fill(BWD_DQ_CONFIGS, ("f32",), (256,), ANY_SEQ, ("mask+kpm+drop",), [_cfg(16, 32, 8, 1, (90,)), _cfg(16, 32, 8, 2, (80,))])
_fill(BWD_DQ_CONFIGS, ("tf32",), (32,), ANY_SEQ, ("kpm", "mask+drop", "mask+kpm+drop"), [_cfg(32, 32, 8, 2, (80,)), _cfg(16, 32, 8, 2, (90,))])
_fill(BWD_DQ_CONFIGS, ("tf32",), (32,), ANY_SEQ, ("plain",), [_cfg(32, 32, 8, 2, (90,)), _cfg(16, 32, 8, 2, (80,))])
_fill(BWD_DQ_CONFIGS, ("tf32",), (64,), ANY_SEQ, ("mask",), [_cfg(32, 32, 8, 2, (90,)), _cfg(16, 32, 8, 2, (80,))])
_fill(BWD_DQ_CONFIGS, ("tf32",), (128,), ANY_SEQ, ("kpm+drop", "mask"), [_cfg(32, 32, 8, 2, (80,)), _cfg(16, 32, 8, 2, (90,))])


def variant(spec) -> str:
    """The config-table key of a specialisation (HAS_MASK, HAS_KPM, HAS_DROPOUT): its name, e.g.
    "mask+kpm+drop", or "plain"."""
    return "+".join(n for n, on in zip(("mask", "kpm", "drop"), spec) if on) or "plain"


# Specialisations that run as a heavier one: (kernel, dtype class, head-dim bucket, name) -> the
# specialisation launched instead. dK/dV at head dim 256 with attn_mask + dropout spills on sm_80
# (fp16/bf16) and on both archs (tf32) with every config tried (16..32 x 16..64 blocks, 2..16 warps,
# 1..2 stages: 140..3800 B), while the same kernel with key padding as well compiles to 165..255
# registers without spills; so that case runs with HAS_KPM and an all-False padding mask (one
# select per score element and an (N, S) byte tensor).
SPEC_ALIAS = {
    ("bwd_dkdv", "f16", 256, "mask+drop"): (True, True, True),
    ("bwd_dkdv", "tf32", 256, "mask+drop"): (True, True, True),
}


def launched_spec(name: str, dc: str, hd: int, spec) -> tuple:
    """The specialisation kernel `name` is launched with for a call of specialisation `spec`."""
    return SPEC_ALIAS.get((name, dc, hd, variant(spec)), spec)


for (_name, _dc, _hd, _var), _to in SPEC_ALIAS.items():
    # Only key padding may be added (the launcher supplies an all-False mask); the aliased key's
    # table entry is the target's, so every key keeps its candidates.
    assert _name == "bwd_dkdv" and _to[1] and (_to[0], _to[2]) == ("mask" in _var.split("+"), "drop" in _var.split("+"))
    for _sq in SEQ_BUCKETS:
        BWD_DKDV_CONFIGS[(_dc, _hd, _sq, _var)] = BWD_DKDV_CONFIGS[(_dc, _hd, _sq, variant(_to))]


# The delta pre-pass is memory bound and tiny: one config.
DELTA_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)

# Under the interpreter: one small config for everything (the interpreter runs a program per block).
INTERPRET_CONFIG = _cfg(16, 16, 1, 1)
INTERPRET_DELTA_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)

KERNELS = {
    "fwd": (_attn_fwd_kernel, FWD_CONFIGS),
    "bwd_dkdv": (_attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS),
    "bwd_dq": (_attn_bwd_dq_kernel, BWD_DQ_CONFIGS),
}
# (HAS_MASK, HAS_KPM, HAS_DROPOUT): every combination is a compiled specialisation. Causality is a
# runtime argument of every kernel (it moves loop bounds and the test in the boundary blocks only).
SPECIALISATIONS = tuple((m, k, d) for m in (False, True) for k in (False, True) for d in (False, True))


def head_dim_bucket(e: int) -> int:
    """Padded head dim for a head dim e in 1..256: the next power of two, at least 32.

    Head dims 1..16 share the 32 bucket (16 would be the smallest tl.dot K): one bucket fewer to
    compile and check ahead of time, at the price of twice the q.k^T / p.v multiply work of a
    16-wide tile for those head dims (the padded columns are masked, never read from memory)."""
    if not 1 <= e <= 256:
        raise ValueError(f"head dim: got {e}, expected 1..256")
    return max(32, triton.next_power_of_2(e))


def seq_bucket(l: int, s: int) -> str:
    return "short" if max(l, s) <= SHORT_SEQ else "long"


def dtype_class(dtype: torch.dtype, allow_tf32: bool) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "f16"
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "f32"
    raise TypeError(f"q.dtype: got {dtype}, expected float16, bfloat16 or float32")


def input_precision(dc: str) -> str:
    """tl.dot's input_precision for a dtype class (only matters for fp32 operands)."""
    return "ieee" if dc == "f32" else "tf32"


def compile_cases():
    """Every (kernel name, kernel, dtype class, head-dim bucket, specialisation, config) a GPU launch
    can choose (union over sequence buckets of the specialisation's table entries), for
    ahead-of-time compilation checks. The delta pre-pass is listed with the specialisation None."""
    cases = []
    for name, (kernel, table) in KERNELS.items():
        for dc in DTYPE_CLASSES:
            for hd in HEAD_DIM_BUCKETS:
                for spec in SPECIALISATIONS:
                    if launched_spec(name, dc, hd, spec) != spec:
                        continue  # runs as (and is compiled under) the heavier specialisation
                    seen = []
                    for sq in SEQ_BUCKETS:
                        for cfg in table[(dc, hd, sq, variant(spec))]:
                            key = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages,
                                   config_archs(cfg))
                            if key not in seen:
                                seen.append(key)
                                cases.append((name, kernel, dc, hd, spec, cfg))
    for hd in HEAD_DIM_BUCKETS:
        for dc in DTYPE_CLASSES:
            for has_mask in (False, True):
                for has_kpm in (False, True):
                    cases.append(("bwd_delta", _attn_bwd_delta_kernel, dc, hd, (has_mask, has_kpm, False),
                                  DELTA_CONFIG))
    return cases


# ==================================================================================================
# Config choice (measured once per key on a GPU, cached)
# ==================================================================================================
_CHOSEN: dict[tuple, triton.Config] = {}


def _autotune_enabled() -> bool:
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


def _device_arch(device: torch.device) -> int:
    """Compute capability as 80, 90, ... (asked at launch time, never at import)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _choose(name: str, key: tuple, candidates: list[triton.Config], launch, device) -> triton.Config:
    """The config to launch with. launch(cfg) runs the kernel once with cfg (outputs overwritten)."""
    if INTERPRET:
        return INTERPRET_CONFIG
    family = arch_family(_device_arch(device))
    full_key = (name, family) + key
    cfg = _CHOSEN.get(full_key)
    if cfg is not None:
        return cfg
    candidates = [c for c in candidates if family in config_archs(c)]
    if len(candidates) == 1 or not _autotune_enabled():
        cfg = candidates[0]
    else:
        from triton.testing import do_bench

        timings = []
        for c in candidates:
            try:
                t = do_bench(lambda: launch(c), warmup=5, rep=20)
            except Exception:  # a config that cannot launch here (resources) is not a candidate
                t = float("inf")
            timings.append(t)
        cfg = candidates[min(range(len(candidates)), key=timings.__getitem__)]
    _CHOSEN[full_key] = cfg
    return cfg


def chosen_configs() -> dict:
    """The configs picked so far, {(kernel, arch family, dtype class, head-dim bucket, seq bucket, variant, spec): config}."""
    return dict(_CHOSEN)


# ==================================================================================================
# Host launchers
# ==================================================================================================
def _check_inputs(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v: got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D tensors, expected 4-D (N, H, L, E)")
    n, hq, _, e = q.shape
    nk, hkv, s, ek = k.shape
    if nk != n or v.shape[0] != n or v.shape[1] != hkv or v.shape[2] != s or ek != e:
        raise ValueError(f"k, v: got shapes {tuple(k.shape)} and {tuple(v.shape)}, expected (N={n}, Hkv, S, E={e}) "
                         "and (N, Hkv, S, Ev)")
    if (hkv == 0 and hq != 0) or (hkv != 0 and hq % hkv != 0):  # no heads at all: an empty result
        raise ValueError(f"k: got {hkv} heads, expected a divisor of q's {hq} heads")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise ValueError(f"{name}: got strides {t.stride()}, expected a contiguous tensor")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype: got {t.dtype}, expected {q.dtype} (q's dtype)")


def _mask_args(attn_mask, q, l, s):
    """(the additive mask as the kernels read it: float32, added at fp32; its strides). Without a
    mask, a float32 placeholder, so the launched kernel's signature is the one compiled ahead of time."""
    if attn_mask is None:
        return torch.empty(1, dtype=torch.float32, device=q.device), (0, 0, 0, 0)
    n, hq = q.shape[:2]
    if tuple(attn_mask.shape) != (n, hq, l, s):
        raise ValueError(f"attn_mask: got shape {tuple(attn_mask.shape)}, expected the expanded view {(n, hq, l, s)}")
    if not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask.dtype: got {attn_mask.dtype}, expected an additive float mask")
    if attn_mask.dtype != torch.float32:  # the contract sends float32; a narrower mask is widened
        attn_mask = attn_mask.float()
    return attn_mask, tuple(attn_mask.stride())


def _kpm_args(key_padding_mask, q, s):
    """(kpm as u8 (N, S), kv_range (N, 2) i32 = [first, last + 1] unpadded key per batch)."""
    if key_padding_mask is None:
        return q, q
    n = q.shape[0]
    if tuple(key_padding_mask.shape) != (n, s) or key_padding_mask.dtype != torch.bool:
        raise ValueError(f"key_padding_mask: got {tuple(key_padding_mask.shape)} {key_padding_mask.dtype}, "
                         f"expected bool {(n, s)}")
    kpm = key_padding_mask.contiguous()
    keep = ~kpm
    idx = torch.arange(s, device=kpm.device, dtype=torch.int32)
    first = torch.where(keep, idx, s).amin(1)
    last = torch.where(keep, idx + 1, 0).amax(1)
    kv_range = torch.stack([first, last], 1).to(torch.int32).contiguous()
    return kpm.view(torch.uint8), kv_range


def _seed_arg(dropout_p, seed):
    if dropout_p == 0.0:
        return 0
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: got {dropout_p}, expected 0 <= p < 1")
    if seed is None or seed.numel() != 1:
        raise ValueError(f"seed: got {None if seed is None else tuple(seed.shape)}, expected an int64 tensor (1,) "
                         "when dropout_p > 0")
    return int(seed.reshape(()).item())


def _common(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, seed):
    n, hq, l, e = q.shape
    hkv, s, ev = k.shape[1], k.shape[2], v.shape[3]
    block_d = head_dim_bucket(e)
    block_dv = head_dim_bucket(ev)
    dc = dtype_class(q.dtype, bool(torch.backends.cuda.matmul.allow_tf32))
    mask, mstrides = _mask_args(attn_mask, q, l, s)
    kpm, kv_range = _kpm_args(key_padding_mask, q, s)
    seed_val = _seed_arg(float(dropout_p), seed)
    flags = dict(HAS_MASK=attn_mask is not None, HAS_KPM=key_padding_mask is not None,
                 HAS_DROPOUT=float(dropout_p) > 0.0, INPUT_PRECISION=input_precision(dc))
    spec = (flags["HAS_MASK"], flags["HAS_KPM"], flags["HAS_DROPOUT"])
    key = (dc, max(block_d, block_dv), seq_bucket(l, s), variant(spec))
    # causal is a runtime bool (typed u1 by the JIT, never specialised on its value): causal and
    # non-causal calls share one compiled kernel.
    dims = dict(Hq=hq, GROUP=hq // hkv, L=l, S=s, HEAD_D=e, HEAD_DV=ev, causal=bool(is_causal),
                BLOCK_D=block_d, BLOCK_DV=block_dv)
    return mask, mstrides, kpm, kv_range, seed_val, flags, key, dims


def attention_forward(q, k, v, attn_mask, key_padding_mask, dropout_p: float, is_causal: bool, scale: float,
                      seed):
    """Fused attention forward.

    q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev): contiguous, one dtype (fp16/bf16/fp32).
    attn_mask: None or additive (N, Hq, L, S) strided view (q's dtype). key_padding_mask: None or
    bool (N, S), True = key ignored. seed: None or int64 CPU tensor (1,) when dropout_p > 0.
    Returns out (N, Hq, L, Ev) in q's dtype and lse (N, Hq, L) float32 (natural log, +inf for a row
    that sees no key; its output row is 0).
    """
    _check_inputs(q, k, v)
    n, hq, l, _ = q.shape
    ev = v.shape[3]
    out = torch.empty((n, hq, l, ev), dtype=q.dtype, device=q.device)
    lse = torch.empty((n, hq, l), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    mask, ms, kpm, kv_range, seed_val, flags, key, dims = _common(q, k, v, attn_mask, key_padding_mask,
                                                                  dropout_p, is_causal, seed)
    qk_scale = float(scale) * LOG2E

    def launch(cfg):
        grid = (triton.cdiv(l, cfg.kwargs["BLOCK_M"]) * n * hq,)
        _attn_fwd_kernel[grid](q, k, v, out, lse, mask, kpm, kv_range, seed_val, float(dropout_p), qk_scale,
                               ms[0], ms[1], ms[2], ms[3], **dims, **flags, **cfg.kwargs,
                               num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = _choose("fwd", key, FWD_CONFIGS[key], launch, q.device)
    launch(cfg)
    return out, lse


def attention_backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p: float,
                       is_causal: bool, scale: float, seed):
    """Fused attention backward: returns dq, dk, dv shaped like q, k, v (dk/dv summed over each GQA
    group's query heads), deterministic (no atomics). Arguments as attention_forward's, plus
    grad_out (N, Hq, L, Ev) contiguous, out and lse from the forward."""
    _check_inputs(q, k, v)
    n, hq, l, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    ev = v.shape[3]
    if tuple(grad_out.shape) != (n, hq, l, ev) or tuple(out.shape) != (n, hq, l, ev):
        raise ValueError(f"grad_out, out: got {tuple(grad_out.shape)}, {tuple(out.shape)}, expected {(n, hq, l, ev)}")
    if tuple(lse.shape) != (n, hq, l) or lse.dtype != torch.float32:
        raise ValueError(f"lse: got {tuple(lse.shape)} {lse.dtype}, expected float32 {(n, hq, l)}")
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    lse = lse.contiguous()
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    mask, ms, kpm, kv_range, seed_val, flags, key, dims = _common(q, k, v, attn_mask, key_padding_mask,
                                                                  dropout_p, is_causal, seed)
    qk_scale = float(scale) * LOG2E

    delta = torch.empty((n, hq, l), dtype=torch.float32, device=q.device)
    lse_base = torch.empty((n, hq, l), dtype=torch.float32, device=q.device)  # lse split by the pre-pass
    lse_rest = torch.empty((n, hq, l), dtype=torch.float32, device=q.device)
    dcfg = INTERPRET_DELTA_CONFIG if INTERPRET else DELTA_CONFIG
    _attn_bwd_delta_kernel[(triton.cdiv(l, dcfg.kwargs["BLOCK_M"]) * n * hq,)](
        out, grad_out, delta, q, k, v, lse, lse_base, lse_rest, mask, kpm, kv_range, float(dropout_p), qk_scale,
        ms[0], ms[1], ms[2], ms[3], **dims, HAS_MASK=flags["HAS_MASK"], HAS_KPM=flags["HAS_KPM"],
        INPUT_PRECISION=flags["INPUT_PRECISION"], **dcfg.kwargs, num_warps=dcfg.num_warps,
        num_stages=dcfg.num_stages)

    # dK/dV may run as a heavier specialisation (SPEC_ALIAS: key padding added, nothing padded).
    dkdv_spec = launched_spec("bwd_dkdv", key[0], key[1], (flags["HAS_MASK"], flags["HAS_KPM"], flags["HAS_DROPOUT"]))
    dkdv_flags, dkdv_kpm, dkdv_key = flags, kpm, key[:3] + (variant(dkdv_spec),)
    if dkdv_spec[1] and not flags["HAS_KPM"]:
        dkdv_flags = dict(flags, HAS_KPM=True)
        dkdv_kpm = torch.zeros((n, s), dtype=torch.uint8, device=q.device)

    def launch_dkdv(cfg):
        grid = (triton.cdiv(s, cfg.kwargs["BLOCK_N"]) * n * hkv,)
        _attn_bwd_dkdv_kernel[grid](q, k, v, grad_out, lse_base, lse_rest, delta, dk, dv, mask, dkdv_kpm, seed_val,
                                    float(dropout_p), qk_scale, float(scale), ms[0], ms[1], ms[2], ms[3], **dims,
                                    **dkdv_flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def launch_dq(cfg):
        grid = (triton.cdiv(l, cfg.kwargs["BLOCK_M"]) * n * hq,)
        _attn_bwd_dq_kernel[grid](q, k, v, grad_out, lse_base, lse_rest, delta, dq, mask, kpm, kv_range, seed_val,
                                  float(dropout_p), qk_scale, float(scale), ms[0], ms[1], ms[2], ms[3], **dims,
                                  **flags, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    launch_dkdv(_choose("bwd_dkdv", dkdv_key, BWD_DKDV_CONFIGS[dkdv_key], launch_dkdv, q.device))
    launch_dq(_choose("bwd_dq", key, BWD_DQ_CONFIGS[key], launch_dq, q.device))
    return dq, dk, dv
