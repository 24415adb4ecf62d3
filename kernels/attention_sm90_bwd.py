"""Attention backward for sm_90 (H100/H200): one kernel, dK/dV then dQ, wgmma tiles, TMA query tiles.

Selected with the sm_90 forward by FASTATTN_TRITON_ATTN (kernels/attention_sm90.py's MODE: "sm90",
the default, or "classic"); fastattn/attention.py's Triton backward calls `backward` first and runs
kernels/attention.py's three kernels when it returns None.

What it serves: fp16/bf16, on a CUDA device of compute capability 9.x, with the classic backward's
whole meaning (kernels/attention.py's docstring is the contract): causal (top-left) and key padding as
runtime flags, an additive float32 attn_mask view (bool masks arrive as 0/-inf), dropout with the
same counter-based Philox mask (element (b, h, i, j) kept iff tl.rand(seed, offset + ((b*Hq + h)*L + i)*S + j)
>= p), GQA, any head dims E, Ev in 1..256 (Ev != E included). fp32 stays with the classic kernels.

Design:
  * One launch after the classic delta pre-pass (_row_stats reads its per-row outputs): program p runs
    phase 1 when p < P1 = N*Hkv*cdiv(S, BLOCK_N) - BLOCK_N keys of one kv head resident (K, V in
    shared memory, dK and dV accumulated in fp32), query blocks of BLOCK_M rows of every query head of
    the GQA group streaming past - and phase 2 when p < P2 = N*Hq*cdiv(L, BLOCK_N): BLOCK_N query
    rows resident (Q, dO, dQ), key blocks of BLOCK_M keys streaming past. No atomics, fixed loop
    orders: bitwise deterministic. (As in Triton's fused-attention tutorial: 7 GEMMs, not FA2's 5,
    but one launch, no dQ partials and no atomics.)
  * Tiles that wgmma takes: the transposed products of phase 1 (K Q^T, V dO^T) are BLOCK_N (128) rows
    of M across the warpgroups and BLOCK_M (32/64) wide; dV += P^T dO and dK += dS^T Q take P^T / dS^T
    from registers. Registers: dK + dV are BLOCK_N * (BD + BDV) fp32 over num_warps * 32 threads; the
    configs keep that at <= 128 per thread (128 keys x hd128 on 8 warps, 64 keys at hd256), with the
    (BLOCK_N, BLOCK_M) score tiles at 16..32 more.
  * USE_TMA (E and Ev multiples of 8, 16-byte aligned bases, not under the interpreter unless asked):
    the streamed tiles (Q and dO in phase 1, K and V in phase 2) are read through 3-D tensor
    descriptors over (heads, rows, head dim) made once per program, so rows past L/S and columns past
    E/Ev read as zero with no mask instructions in the loop; the interior loop is a tl.range with
    LOOP_STAGES stages (the pipeliner prefetches the next tiles). Otherwise plain loads with the row
    and head-dim masks (E not a multiple of 8, e.g. the classifier's 25).
  * The scale stays outside the products (s * qk_scale, qk_scale in the classic kernels' units: scale *
    log2(e), or scale with a mask), and P comes from the classic delta pre-pass's split log-sum-exp
    through _classic._bwd_probs, so both backwards compute P the same way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import attention as _classic
from . import attention_sm90 as _fwd

INTERPRET = _classic.INTERPRET
LOG2E = _classic.LOG2E
_WIDEN_BF16 = tl.constexpr(INTERPRET)  # the 3.9 interpreter's bf16 dot: see kernels/attention.py


# ==================================================================================================
# Triton program
# ==================================================================================================
@triton.jit
def _operand(x, dtype: tl.constexpr):
    """x rounded to the products' input dtype. Under the interpreter a bf16 operand is then widened
    back to fp32 (its dot reads bf16 wrongly), so the interpreter still sees the GPU's rounding."""
    r = x.to(dtype)
    if _WIDEN_BF16 and dtype == tl.bfloat16:
        r = r.to(tl.float32)
    return r


@triton.jit
def _rows(desc, base, hd_idx, row0, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          BOUNDARY: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [row0, row0 + BLOCK_R) of one head's row-major (R, C) matrix (base: its first element,
    hd_idx: its index along the descriptor's first dim), zero past R and C."""
    if USE_TMA:
        t = tl.reshape(desc.load([hd_idx, row0, 0]), (BLOCK_R, BLOCK_C))
    else:
        offs_r = row0 + tl.arange(0, BLOCK_R)
        offs_c = tl.arange(0, BLOCK_C)
        ok = offs_c[None, :] < C
        if BOUNDARY:
            ok = ok & (offs_r[:, None] < R)
        t = tl.load(base + offs_r[:, None] * C + offs_c[None, :], mask=ok, other=0.0)
    if _WIDEN_BF16 and t.dtype == tl.bfloat16:
        t = t.to(tl.float32)
    return t


@triton.jit
def _row_stats(lse_ptr, delta_base, L, offs_m, m_ok):
    """What the softmax backward needs per query row, from the classic delta pre-pass: (base, rest,
    delta): its split log-sum-exp (lse_ptr: the head's (2, L) rows; P = _bwd_probs(s, base, rest),
    base +inf for a row that sees no key) and delta."""
    base = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf"))
    rest = tl.load(lse_ptr + L + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
    return base, rest, delta


@triton.jit
def _kv_step(dk, dv, k, v, q_desc, do_desc, q_base, do_base, lse_base, delta_base, mask_cols, drop_base,
             seed, bh, start_m, offs_n, dropout_p, qk_scale, L, S, HEAD_D, HEAD_DV, stride_ml, causal,
             BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
             BOUNDARY: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
             DT: tl.constexpr):
    """Phase 1: one query block's contribution to the resident keys' dK, dV, as (BN, BM) tiles."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < L
    q = _rows(q_desc, q_base, bh, start_m, L, HEAD_D, BLOCK_M, BLOCK_D, BOUNDARY, USE_TMA)
    do = _rows(do_desc, do_base, bh, start_m, L, HEAD_DV, BLOCK_M, BLOCK_DV, BOUNDARY, USE_TMA)
    base, rest, delta = _row_stats(lse_base, delta_base, L, offs_m, m_ok)
    sT = tl.dot(k, tl.trans(q)) * qk_scale                                            # (BN, BM)
    if HAS_MASK:  # natural-log units; only -inf excludes (as in the classic kernels' _scores)
        mvals = tl.load(mask_cols[:, None] + offs_m[None, :].to(tl.int64) * stride_ml,
                        mask=(offs_n[:, None] < S) & m_ok[None, :], other=0.0)
        sT = tl.where(mvals == float("-inf"), float("-inf"), sT + mvals)
    pT = _classic._bwd_probs(sT, base[None, :], rest[None, :], HAS_MASK)
    if BOUNDARY:
        n_diag = tl.where(causal, offs_n, 0)
        visible = (offs_n[:, None] < S) & m_ok[None, :] & (n_diag[:, None] <= offs_m[None, :])
        pT = tl.where(visible, pT, 0.0)
    dpT = tl.dot(v, tl.trans(do))                                                     # (BN, BM)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(seed, volatile=True),
                       drop_base + offs_m[None, :].to(tl.int64) * S + offs_n[:, None]) >= dropout_p
        pT_kept = tl.where(keep, pT, 0.0)  # 1/(1-p) goes on dV once, at the end
        dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
    else:
        pT_kept = pT
    dv = tl.dot(_operand(pT_kept, DT), do, dv)
    dsT = pT * (dpT - delta[None, :])
    dk = tl.dot(_operand(dsT, DT), q, dk)
    return dk, dv


@triton.jit
def _q_step(dq, q, do, base, rest, delta, k_desc, v_desc, k_base, v_base, mask_rows, kpm_base, drop_rows, seed,
            bhk, start_n, offs_m, dropout_p, qk_scale, L, S, HEAD_D, HEAD_DV, stride_ms, causal, has_kpm,
            BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
            BOUNDARY: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr,
             DT: tl.constexpr):
    """Phase 2: one block of BLOCK_K keys' contribution to the resident rows' dQ."""
    offs_n = start_n + tl.arange(0, BLOCK_K)
    n_ok = offs_n < S
    k = _rows(k_desc, k_base, bhk, start_n, S, HEAD_D, BLOCK_K, BLOCK_D, BOUNDARY, USE_TMA)
    v = _rows(v_desc, v_base, bhk, start_n, S, HEAD_DV, BLOCK_K, BLOCK_DV, BOUNDARY, USE_TMA)
    s = tl.dot(q, tl.trans(k)) * qk_scale                                             # (BM, BK)
    if HAS_MASK:  # natural-log units; only -inf excludes
        mvals = tl.load(mask_rows[:, None] + offs_n[None, :].to(tl.int64) * stride_ms,
                        mask=(offs_m[:, None] < L) & n_ok[None, :], other=0.0)
        s = tl.where(mvals == float("-inf"), float("-inf"), s + mvals)
    p = _classic._bwd_probs(s, base[:, None], rest[:, None], HAS_MASK)
    if has_kpm:  # a runtime flag: one uniform branch per key block
        pad = tl.load(kpm_base + offs_n, mask=n_ok, other=1)
        p = tl.where(pad[None, :] == 0, p, 0.0)
    if BOUNDARY:
        n_diag = tl.where(causal, offs_n, 0)
        visible = n_ok[None, :] & (n_diag[None, :] <= offs_m[:, None])
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do, tl.trans(v))                                                      # (BM, BK)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(seed, volatile=True), drop_rows[:, None] + offs_n[None, :]) >= dropout_p
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(_operand(ds, DT), k, dq)
    return dq


@triton.jit
def _descriptor(base, heads, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """A (heads, rows, cols) row-major tensor's descriptor, one head's BLOCK_R x BLOCK_C tile a load."""
    return tl.make_tensor_descriptor(base, shape=[heads, rows, cols], strides=[rows * cols, cols, 1],
                                     block_shape=[1, BLOCK_R, BLOCK_C])


@triton.jit(do_not_specialize=_classic._NO_SPECIALIZE + ["NB"])
def _attn_bwd_sm90_kernel(
    Q, K, V, DOut, LseSplit, Delta,  # q (N,Hq,L,E), k (N,Hkv,S,E), v (N,Hkv,S,Ev), dO (N,Hq,L,Ev); the delta
                                     # pre-pass's split lse (N,Hq,2,L) and delta (N,Hq,L) f32
    DQ, DK, DV,                 # shaped like q, k, v
    Mask, Kpm, KvRange,         # additive (N,Hq,L,S) f32 strided view; (N,S) u8; (N,2) i32 unpadded key range
    seed, dropout_p, qk_scale, sm_scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    NB, Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal, has_kpm,            # runtime bools
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, USE_TMA: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    DT: tl.constexpr = Q.dtype.element_ty
    pid = tl.program_id(0)
    Hkv = Hq // GROUP
    num_n = tl.cdiv(S, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    # ---- phase 1: dK, dV of BLOCK_N keys of kv head bhk -------------------------------------------
    if pid < NB * Hkv * num_n:
        bhk = pid // num_n
        start_n = (pid % num_n) * BLOCK_N
        b = bhk // Hkv
        hk = bhk % Hkv
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        q_desc = Q
        do_desc = DOut
        if USE_TMA:  # made once per program; each load names its head
            q_desc = _descriptor(Q, NB * Hq, L, HEAD_D, BLOCK_M, BLOCK_D)
            do_desc = _descriptor(DOut, NB * Hq, L, HEAD_DV, BLOCK_M, BLOCK_DV)
        k = _rows(K, K + bhk.to(tl.int64) * S * HEAD_D, bhk, start_n, S, HEAD_D, BLOCK_N, BLOCK_D, True, False)
        v = _rows(V, V + bhk.to(tl.int64) * S * HEAD_DV, bhk, start_n, S, HEAD_DV, BLOCK_N, BLOCK_DV, True, False)

        key_ok, m_lo, f_lo, f_hi, n_head, n_bound = _classic._dkdv_query_blocks(
            Kpm + b.to(tl.int64) * S, offs_n, start_n, L, S, causal, has_kpm, BLOCK_M, BLOCK_N)

        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bh = b * Hq + h
            q_base = Q + bh.to(tl.int64) * L * HEAD_D
            do_base = DOut + bh.to(tl.int64) * L * HEAD_DV
            lse_base = LseSplit + bh.to(tl.int64) * 2 * L
            delta_base = Delta + bh.to(tl.int64) * L
            mask_cols = Mask
            if HAS_MASK:
                mask_cols = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                             + offs_n.to(tl.int64) * stride_ms)
            drop_base = bh.to(tl.int64) * L * S
            if HAS_DROPOUT:  # seed points at (Philox seed, counter offset), read on the device (graph-safe)
                drop_base += tl.load(seed + 1)
            for start_m in tl.range(f_lo, f_hi, BLOCK_M, num_stages=LOOP_STAGES):
                dk, dv = _kv_step(dk, dv, k, v, q_desc, do_desc, q_base, do_base, lse_base, delta_base,
                                  mask_cols, drop_base, seed, bh, start_m, offs_n, dropout_p, qk_scale,
                                  L, S, HEAD_D, HEAD_DV, stride_ml, causal, BLOCK_M, BLOCK_D, BLOCK_DV,
                                  False, HAS_MASK, HAS_DROPOUT, USE_TMA, DT)
            for i in range(0, n_bound):
                start_m = tl.where(i < n_head, m_lo + i * BLOCK_M, f_hi + (i - n_head) * BLOCK_M)
                dk, dv = _kv_step(dk, dv, k, v, q_desc, do_desc, q_base, do_base, lse_base, delta_base,
                                  mask_cols, drop_base, seed, bh, start_m, offs_n, dropout_p, qk_scale,
                                  L, S, HEAD_D, HEAD_DV, stride_ml, causal, BLOCK_M, BLOCK_D, BLOCK_DV,
                                  True, HAS_MASK, HAS_DROPOUT, USE_TMA, DT)
        if HAS_DROPOUT:
            dv = dv / (1.0 - dropout_p)
        dk = tl.where(key_ok[:, None], dk * sm_scale, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
        tl.store(DK + bhk.to(tl.int64) * S * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D))
        tl.store(DV + bhk.to(tl.int64) * S * HEAD_DV + offs_n[:, None] * HEAD_DV + offs_dv[None, :],
                 dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV))

    # ---- phase 2: dQ of BLOCK_N query rows of head bh --------------------------------------------
    num_m = tl.cdiv(L, BLOCK_N)
    if pid < NB * Hq * num_m:
        bh = pid // num_m
        pid_m = pid % num_m
        pid_m = tl.where(causal, num_m - 1 - pid_m, pid_m)  # causal: the longest rows first
        b = bh // Hq
        h = bh % Hq
        bhk = b * Hkv + h // GROUP
        start_m = pid_m * BLOCK_N
        offs_m = start_m + tl.arange(0, BLOCK_N)
        m_ok = offs_m < L
        q = _rows(Q, Q + bh.to(tl.int64) * L * HEAD_D, bh, start_m, L, HEAD_D, BLOCK_N, BLOCK_D, True, False)
        do = _rows(DOut, DOut + bh.to(tl.int64) * L * HEAD_DV, bh, start_m, L, HEAD_DV, BLOCK_N, BLOCK_DV,
                   True, False)
        base, rest, delta = _row_stats(LseSplit + bh.to(tl.int64) * 2 * L, Delta + bh.to(tl.int64) * L, L,
                                       offs_m, m_ok)
        k_base = K + bhk.to(tl.int64) * S * HEAD_D
        v_base = V + bhk.to(tl.int64) * S * HEAD_DV
        mask_rows = Mask
        if HAS_MASK:
            mask_rows = (Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
                         + offs_m.to(tl.int64) * stride_ml)
        kpm_base = Kpm + b.to(tl.int64) * S
        drop_rows = (bh.to(tl.int64) * L + offs_m) * S
        if HAS_DROPOUT:
            drop_rows += tl.load(seed + 1)
        k_desc = K
        v_desc = V
        if USE_TMA:
            k_desc = _descriptor(K, NB * Hkv, S, HEAD_D, BLOCK_M, BLOCK_D)
            v_desc = _descriptor(V, NB * Hkv, S, HEAD_DV, BLOCK_M, BLOCK_DV)

        n_end = tl.where(causal, tl.minimum(S, start_m + BLOCK_N), S)
        kv_lo = tl.load(KvRange + 2 * b, mask=has_kpm, other=0)
        kv_hi = tl.load(KvRange + 2 * b + 1, mask=has_kpm, other=S)
        lo = (kv_lo // BLOCK_M) * BLOCK_M
        n_end = tl.minimum(n_end, kv_hi)
        full_end = tl.where(causal, tl.minimum(n_end, start_m + 1), n_end)
        full_end = tl.maximum((full_end // BLOCK_M) * BLOCK_M, lo)

        dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_n in tl.range(lo, full_end, BLOCK_M, num_stages=LOOP_STAGES):
            dq = _q_step(dq, q, do, base, rest, delta, k_desc, v_desc, k_base, v_base, mask_rows, kpm_base, drop_rows,
                         seed, bhk, start_n, offs_m, dropout_p, qk_scale, L, S, HEAD_D, HEAD_DV, stride_ms,
                         causal, has_kpm, BLOCK_M, BLOCK_D, BLOCK_DV, False, HAS_MASK, HAS_DROPOUT, USE_TMA, DT)
        for start_n in range(full_end, n_end, BLOCK_M):
            dq = _q_step(dq, q, do, base, rest, delta, k_desc, v_desc, k_base, v_base, mask_rows, kpm_base, drop_rows,
                         seed, bhk, start_n, offs_m, dropout_p, qk_scale, L, S, HEAD_D, HEAD_DV, stride_ms,
                         causal, has_kpm, BLOCK_M, BLOCK_D, BLOCK_DV, True, HAS_MASK, HAS_DROPOUT, USE_TMA, DT)
        dq = dq * sm_scale
        tl.store(DQ + bh.to(tl.int64) * L * HEAD_D + offs_m[:, None] * HEAD_D + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_D))


# ==================================================================================================
# Configurations (sm_90 only). tests/test_triton_sm90_attention.py compiles every case for sm_90 with
# triton 3.9 and 3.6 (tests/aot/sm90.py) and asserts wgmma, TMA loads where used, no spills and
# shared memory <= 227 KB. BLOCK_N: keys resident in phase 1 / query rows resident in phase 2;
# BLOCK_M: query rows (phase 1) / keys (phase 2) per step.
# ==================================================================================================
def _cfg(block_m, block_n, num_warps, loop_stages):
    cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "LOOP_STAGES": loop_stages},
                        num_warps=num_warps, num_stages=loop_stages)
    cfg.archs = (90,)
    return cfg


HEAD_DIM_BUCKETS = (32, 64, 128, 256)
VARIANTS = ("plain", "mask", "drop", "mask+drop")  # configs.variant(HAS_MASK, HAS_DROPOUT)
# (head-dim bucket, variant) -> tile, or absent: no tile of this kernel compiled without spills on both
# triton 3.6 and 3.9 for sm_90 (found by the AOT sweep), and the classic backward serves the call.
BWD_SM90_CONFIGS: dict[tuple, object] = {
    (32, "plain"): _cfg(32, 64, 4, 2),
    (32, "mask"): _cfg(16, 64, 4, 1),
    (32, "drop"): _cfg(32, 64, 4, 2),
    (64, "plain"): _cfg(32, 128, 8, 2),
    (128, "plain"): _cfg(16, 64, 8, 2),
}
INTERPRET_CONFIG = _cfg(16, 32, 1, 1)


def compile_cases():
    """Every (head-dim bucket, variant, config, USE_TMA) a launch on sm_90 can choose."""
    return [(hd, var, cfg, tma) for (hd, var), cfg in BWD_SM90_CONFIGS.items() for tma in (True, False)]


def case_constexprs(hd: int, var: str, cfg, use_tma: bool) -> dict:
    return dict(cfg.kwargs, BLOCK_D=hd, BLOCK_DV=hd, HAS_MASK="mask" in var, HAS_DROPOUT="drop" in var,
                USE_TMA=use_tma)


# ==================================================================================================
# Launcher
# ==================================================================================================
def _config(q, v, attn_mask, dropout_p):
    hd = max(_classic.configs.head_dim_bucket(q.shape[3]), _classic.configs.head_dim_bucket(v.shape[3]))
    return BWD_SM90_CONFIGS.get((hd, _classic.configs.variant(attn_mask is not None, float(dropout_p) > 0.0)))


def serves(q, k, v, attn_mask=None, dropout_p=0.0, force: bool = False) -> bool:
    """Whether this backward serves the call (force: ignore device, mode and the config table, for the
    interpreter tests, which run every variant)."""
    if q.dtype not in (torch.float16, torch.bfloat16) or q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return False
    if force:
        return True
    if _fwd.MODE != "sm90" or not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    return _config(q, v, attn_mask, dropout_p) is not None


def backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p: float, is_causal: bool,
             scale: float, seed, force: bool = False, use_tma: bool | None = None):
    """(dq, dk, dv) from the sm_90 kernel, or None when it does not serve the call (the caller then
    runs the classic backward). Arguments as kernels.attention.attention_backward's.
    use_tma: None = where the layout allows (never under the interpreter); True/False to force."""
    if not serves(q, k, v, attn_mask, dropout_p, force):
        return None
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    with _classic._device_of(q):
        c = _classic._Launch(q, k, v, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed)
        e, ev = q.shape[3], v.shape[3]
        aligned = e % 8 == 0 and ev % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in (q, k, v, grad_out))
        tma = aligned and (not INTERPRET if use_tma is None else use_tma)
        if tma and not INTERPRET:
            _fwd._ensure_allocator()
        delta, lse_split = _classic.backward_prepass(c, q, k, v, out, grad_out, lse)  # what _row_stats reads
        cfg = INTERPRET_CONFIG if INTERPRET else _config(q, v, attn_mask, dropout_p)
        if cfg is None:  # forced on a GPU for a case without a spill-free tile
            return None
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        grid = (max(c.n * c.hkv * triton.cdiv(c.s, bn), c.n * c.hq * triton.cdiv(c.l, bn)),)
        ms = c.mstrides
        flags = dict(c.flags)
        flags.pop("INPUT_PRECISION")
        dims = dict(c.dims, BLOCK_D=c.hd, BLOCK_DV=c.hd)  # one bucket for both: the AOT-compiled cases
        _attn_bwd_sm90_kernel[grid](
            q, k, v, grad_out, lse_split, delta, dq, dk, dv, c.mask, c.kpm, c.kv_range, c.seed, c.dropout_p,
            c.qk_scale, c.scale, ms[0], ms[1], ms[2], ms[3], c.n, **dims, **flags, **cfg.kwargs,
            USE_TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv
