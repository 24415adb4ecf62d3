"""Attention for small problems (issue 14, the classifier's shape): one program owns one (batch, head).

The classifier (nn.TransformerEncoder, d_model 100, 4 heads) calls attention with N 32, H 4, L = S = 256,
head dim 25: 128 (batch, head) pairs, a few microseconds of GPU work, so the launch path decides. Here
a whole (batch, head) is one program:

  * Forward: every key of the head (S <= 256, padded to BLOCK_S, a power of two) is loaded once into
    the program and stays there while query rows pass in blocks of BLOCK_M: scores (BLOCK_M, BLOCK_S),
    the exact softmax in one pass (row max, sum, no online rescale), P V, out and lse stored.
  * Backward: one program per (batch, kv head) holds K, V and the dK, dV accumulators (BLOCK_S rows)
    and walks every query block of every query head of its GQA group, on transposed tiles (keys x
    queries, the keys along the warps, as the classic dK/dV kernel): it recomputes the scores and the
    exact softmax (row max and sum from the resident keys: it reads neither the forward's lse nor its
    out), dP = V dO^T, delta = rowsum(P dP) (= rowsum(dO O), unrounded, as torch's math), dS, and
    stores that block's dQ = dS^T K directly (the program owns those rows); dK, dV are stored once at
    the end. One launch, no atomics, no delta pre-pass, no dQ kernel: deterministic.
  * One compiled kernel per (dtype class, head-dim bucket, BLOCK_S): attn_mask, key padding, dropout
    and causality are runtime flags (uniform branches per query block), and scores are always in
    natural-log units (exp2 takes (s - m) * log2(e)), so a mask of -3e38 is a score as the contract says.
  * Semantics as the classic kernels (kernels/attention.py, fastattn/backends/README.md): only -inf
    excludes a key (set, not added), a row that sees no key gives out 0, lse +inf and zero gradients
    ("no key seen" is l == 0, so a NaN propagates), dropout element (b, h, i, j) is kept iff
    tl.rand(seed, offset + ((b*Hq + h)*L + i)*S + j) >= p (fastattn/_philox.py), fp32 uses
    input_precision ieee, or tf32 under torch.backends.cuda.matmul.allow_tf32.
  * bf16 under the interpreter: operands are widened to fp32 after the rounding the GPU does
    (_operand), so the interpreter tests see P and dS rounded to the input dtype before the products.

What it serves (else `forward`/`backward` return None and the next kernels in line run: sm_90's, then
kernels/attention.py's): L <= MAX_L, S <= 256, GQA, every mask/padding/dropout/causal combination, on
CUDA (or under the interpreter, CPU tensors, as on sm_90), for the keys of TILES (dtype class x head-dim
bucket x BLOCK_S x arch; compiled ahead of time by tests/aot/small.py for sm_80 and sm_90 with triton
3.6 and 3.9: no stack, no spills): fp16/bf16 at head-dim bucket 32 (E, Ev <= 32: the classifier's 25),
forward and backward, the S = 256 backward on sm_90 only (on sm_80 every tile tried keeps 24-32 B of
stack); fp16/bf16 at bucket 64, the forward for S <= 256 and the backward for S <= 128; tf32 at bucket 32,
forward and backward for S <= 128, forward for S <= 256; true fp32 (ieee: FMA products) not at all (it
spills).

Selection: FASTATTN_TRITON_SMALL=1 (default) or 0, read once at import; use_small(on) switches it for
the process (bench/gpu_speed.py compares both in one run). CALLS counts the launches this path made
(the tests assert it served).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import configs
from ._seed import seed_offset_tensor
from .configs import INTERPRET

LOG2E = 1.4426950408889634
_WIDEN_BF16 = tl.constexpr(INTERPRET)  # as in kernels/attention.py: the 3.9 interpreter's bf16 dot

MAX_S = 256           # keys resident in one program
MAX_L = 1024          # query rows one program walks (beyond: the classic kernels' query-block parallelism)


def _read_env() -> bool:
    val = os.environ.get("FASTATTN_TRITON_SMALL", "1").strip()
    if val not in ("0", "1", ""):
        raise ValueError(f"fastattn: environment variable 'FASTATTN_TRITON_SMALL' got {val!r}; expected '0' or '1'")
    return val != "0"


ENABLED = _read_env()  # read once
CALLS = {"fwd": 0, "bwd": 0}  # launches made by this path


def use_small(on: bool) -> None:
    """Turn the small path on or off for this process (benchmarks compare it with the classic one)."""
    global ENABLED
    if not isinstance(on, bool):
        raise ValueError(f"fastattn: argument 'on' got {on!r}; expected True or False")
    ENABLED = on
    _DECISIONS.clear()


# ==================================================================================================
# Triton programs
# ==================================================================================================
_NO_SPECIALIZE = ["seed", "stride_mb", "stride_mh", "Hq", "GROUP"]


@triton.jit
def _operand(x, dtype: tl.constexpr):
    """x rounded to the products' input dtype; under the interpreter a bf16 operand is widened back to
    fp32 afterwards (its dot reads bf16 wrongly), so the interpreter still sees the GPU's rounding."""
    r = x.to(dtype)
    if _WIDEN_BF16 and dtype == tl.bfloat16:
        r = r.to(tl.float32)
    return r


@triton.jit
def _tile(base, offs_r, offs_c, R, C):
    """The (len(offs_r), len(offs_c)) tile of a row-major (R, C) matrix at base, zero outside."""
    t = tl.load(base + offs_r[:, None] * C + offs_c[None, :],
                mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0)
    if _WIDEN_BF16 and t.dtype == tl.bfloat16:
        t = t.to(tl.float32)
    return t


@triton.jit
def _kv(base, offs_r, offs_c, R, C, VOLATILE: tl.constexpr):
    """A K or V tile (rows offs_r of a row-major (R, C) matrix). VOLATILE: a load the compiler may not
    hoist out of the query loop (the tile is then read from L1/L2 once per query block instead of held
    in registers across the loop)."""
    t = tl.load(base + offs_r[:, None] * C + offs_c[None, :],
                mask=(offs_r[:, None] < R) & (offs_c[None, :] < C), other=0.0, volatile=VOLATILE)
    if _WIDEN_BF16 and t.dtype == tl.bfloat16:
        t = t.to(tl.float32)
    return t


@triton.jit
def _probs(q, k, mask_bh, key_ok, offs_m, offs_n, scale, stride_ml, stride_ms, L, causal, has_mask,
           INPUT_PRECISION: tl.constexpr):
    """(P, l): the exact softmax of one query block against every resident key, P (BM, BS) f32
    normalised (0 on a row that sees no key), and the row sums l (0 on such a row), with the row max
    m (natural-log units) for the lse."""
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * scale             # (BM, BS)
    if has_mask:  # a runtime flag: one uniform branch per query block
        mvals = tl.load(mask_bh + (offs_m[:, None] * stride_ml + offs_n[None, :] * stride_ms),
                        mask=(offs_m[:, None] < L) & key_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(mvals == float("-inf"), float("-inf"), s + mvals)
    n_diag = tl.where(causal, offs_n, 0)  # causal: key j is visible to row i iff j <= i
    visible = key_ok[None, :] & (n_diag[None, :] <= offs_m[:, None])
    s = tl.where(visible, s, float("-inf"))
    m = tl.max(s, 1)
    m_sub = tl.where(m == float("-inf"), 0.0, m)  # a row that sees no key: exp2(-inf) = 0, not NaN
    p = tl.math.exp2((s - m_sub[:, None]) * 1.4426950408889634)
    l = tl.sum(p, 1)
    inv = 1.0 / tl.where(l == 0.0, 1.0, l)
    return p * inv[:, None], l, m


@triton.jit
def _probs_t(q, k, mask_bh, key_ok, offs_m, offs_n, scale, stride_ml, stride_ms, L, causal, has_mask,
             INPUT_PRECISION: tl.constexpr):
    """_probs transposed: P^T (BS, BM) of one query block against every resident key, normalised."""
    sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * scale            # (BS, BM)
    if has_mask:
        mvals = tl.load(mask_bh + (offs_m[None, :] * stride_ml + offs_n[:, None] * stride_ms),
                        mask=(offs_m[None, :] < L) & key_ok[:, None], other=0.0).to(tl.float32)
        sT = tl.where(mvals == float("-inf"), float("-inf"), sT + mvals)
    n_diag = tl.where(causal, offs_n, 0)
    visible = key_ok[:, None] & (n_diag[:, None] <= offs_m[None, :])
    sT = tl.where(visible, sT, float("-inf"))
    m = tl.max(sT, 0)
    m_sub = tl.where(m == float("-inf"), 0.0, m)
    pT = tl.math.exp2((sT - m_sub[None, :]) * 1.4426950408889634)
    l = tl.sum(pT, 0)
    inv = 1.0 / tl.where(l == 0.0, 1.0, l)
    return pT * inv[None, :]


@triton.jit
def _keys_seen(Kpm, b, offs_n, S, has_kpm):
    """(keys in range, keys in range and not padded) of batch element b: both kernels' key masks."""
    n_ok = offs_n < S
    key_ok = n_ok
    if has_kpm:
        pad = tl.load(Kpm + b.to(tl.int64) * S + offs_n, mask=n_ok, other=1)
        key_ok = key_ok & (pad == 0)
    return n_ok, key_ok


@triton.jit
def _dropout_state(seed, dropout_p):
    """(Philox seed, counter offset, 1 / (1 - p)): seed is a real (2,) int64 tensor at every launch (a
    dummy without dropout), read on the device so a CUDA-graph replay sees the generator's state."""
    return tl.load(seed), tl.load(seed + 1), 1.0 / (1.0 - dropout_p)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _small_fwd_kernel(
    Q, K, V, Out, Lse,        # q (N,Hq,L,E), k (N,Hkv,S,E), v (N,Hkv,S,Ev), out (N,Hq,L,Ev), lse (N,Hq,L) f32
    Mask, Kpm,                # additive (N,Hq,L,S) f32 strided view; (N,S) u8, 1 = ignore
    seed, dropout_p, scale,   # *i64 (philox seed, counter offset); dropout prob; softmax scale
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal, has_kpm, has_mask, has_dropout,   # runtime bools
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, KV_RESIDENT: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // Hq
    h = bh % Hq
    bhk = b * (Hq // GROUP) + h // GROUP
    offs_n = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    _, key_ok = _keys_seen(Kpm, b, offs_n, S, has_kpm)
    k_base = K + bhk.to(tl.int64) * S * HEAD_D
    v_base = V + bhk.to(tl.int64) * S * HEAD_DV
    if KV_RESIDENT:  # loaded once, held across the query loop
        k = _kv(k_base, offs_n, offs_d, S, HEAD_D, False)                             # (BS, BD)
        v = _kv(v_base, offs_n, offs_dv, S, HEAD_DV, False)                           # (BS, BDV)
    mask_bh = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    philox, drop_off, inv_keep = _dropout_state(seed, dropout_p)
    q_base = Q + bh.to(tl.int64) * L * HEAD_D
    o_base = Out + bh.to(tl.int64) * L * HEAD_DV
    for start_m in range(0, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        if not KV_RESIDENT:  # re-read (L1/L2) every query block: nothing held across the loop
            k = _kv(k_base, offs_n, offs_d, S, HEAD_D, True)
            v = _kv(v_base, offs_n, offs_dv, S, HEAD_DV, True)
        q = _tile(q_base, offs_m, offs_d, L, HEAD_D)                                   # (BM, BD)
        p, l, m = _probs(q, k, mask_bh, key_ok, offs_m, offs_n, scale, stride_ml, stride_ms, L, causal,
                         has_mask, INPUT_PRECISION)
        if has_dropout:
            keep = tl.rand(philox, (bh.to(tl.int64) * L * S + drop_off)
                           + (offs_m[:, None] * S + offs_n[None, :])) >= dropout_p
            p = tl.where(keep, p * inv_keep, 0.0)
        out = tl.dot(_operand(p, Q.dtype.element_ty), v, input_precision=INPUT_PRECISION)  # (BM, BDV)
        tl.store(o_base + offs_m[:, None] * HEAD_DV + offs_dv[None, :], out.to(Out.dtype.element_ty),
                 mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV))
        seen = l != 0.0  # a NaN sum counts as seen: the NaN propagates
        lse = tl.where(seen, m + tl.math.log2(tl.where(seen, l, 1.0)) * 0.6931471805599453, float("inf"))
        tl.store(Lse + bh.to(tl.int64) * L + offs_m, lse, mask=m_ok)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _small_bwd_kernel(
    Q, K, V, DOut,            # as the forward's; dO (N,Hq,L,Ev)
    DQ, DK, DV,               # dq (N,Hq,L,E), dk (N,Hkv,S,E), dv (N,Hkv,S,Ev)
    Mask, Kpm,
    seed, dropout_p, scale,
    stride_mb, stride_mh, stride_ml, stride_ms,
    Hq, GROUP, L, S, HEAD_D, HEAD_DV,
    causal, has_kpm, has_mask, has_dropout,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, KV_RESIDENT: tl.constexpr,
):
    bhk = tl.program_id(0)
    Hkv = Hq // GROUP
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok, key_ok = _keys_seen(Kpm, b, offs_n, S, has_kpm)
    k_base = K + bhk.to(tl.int64) * S * HEAD_D
    v_base = V + bhk.to(tl.int64) * S * HEAD_DV
    if KV_RESIDENT:  # loaded once, held across the query loop
        k = _kv(k_base, offs_n, offs_d, S, HEAD_D, False)                             # (BS, BD)
        v = _kv(v_base, offs_n, offs_dv, S, HEAD_DV, False)                           # (BS, BDV)
    philox, drop_off, inv_keep = _dropout_state(seed, dropout_p)
    DT = Q.dtype.element_ty
    dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * Hq + h
        q_base = Q + bh.to(tl.int64) * L * HEAD_D
        do_base = DOut + bh.to(tl.int64) * L * HEAD_DV
        dq_base = DQ + bh.to(tl.int64) * L * HEAD_D
        mask_bh = Mask + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if not KV_RESIDENT:  # re-read (L1/L2) every query block: nothing held across the loop
                k = _kv(k_base, offs_n, offs_d, S, HEAD_D, True)
                v = _kv(v_base, offs_n, offs_dv, S, HEAD_DV, True)
            q = _tile(q_base, offs_m, offs_d, L, HEAD_D)                               # (BM, BD)
            do = _tile(do_base, offs_m, offs_dv, L, HEAD_DV)                           # (BM, BDV)
            # transposed tiles (keys x queries): the keys lie along the warps, so the resident K, V and
            # the dK, dV accumulators are split between them, never copied into every warp
            pT = _probs_t(q, k, mask_bh, key_ok, offs_m, offs_n, scale, stride_ml, stride_ms, L, causal,
                          has_mask, INPUT_PRECISION)                                   # (BS, BM)
            dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)             # (BS, BM)
            pT_kept = pT
            if has_dropout:
                # counters: one i64 base per head, i32 offsets within it (L * S < 2^31 here)
                keep = tl.rand(philox, (bh.to(tl.int64) * L * S + drop_off)
                               + (offs_m[None, :] * S + offs_n[:, None])) >= dropout_p
                pT_kept = tl.where(keep, pT, 0.0)  # the 1/(1-p) scale is applied to dv once, at the end
                dpT = tl.where(keep, dpT * inv_keep, 0.0)
            delta = tl.sum(pT * dpT, 0)                                                # rowsum(dO O)
            dsT = _operand(pT * (dpT - delta[None, :]), DT)
            dv = tl.dot(_operand(pT_kept, DT), do, dv, input_precision=INPUT_PRECISION)
            dk = tl.dot(dsT, q, dk, input_precision=INPUT_PRECISION)
            dq = tl.dot(tl.trans(dsT), k, input_precision=INPUT_PRECISION) * scale     # (BM, BD)
            tl.store(dq_base + offs_m[:, None] * HEAD_D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                     mask=(offs_m[:, None] < L) & (offs_d[None, :] < HEAD_D))
    # a padded key's rows get 0 (its P and dS are 0 already; this also keeps a NaN in q or dO out)
    dk = tl.where(key_ok[:, None], dk * scale, 0.0)
    dv = tl.where(key_ok[:, None], dv * inv_keep, 0.0)
    tl.store(DK + bhk.to(tl.int64) * S * HEAD_D + offs_n[:, None] * HEAD_D + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_D))
    tl.store(DV + bhk.to(tl.int64) * S * HEAD_DV + offs_n[:, None] * HEAD_DV + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV))


KERNELS = {"small_fwd": _small_fwd_kernel, "small_bwd": _small_bwd_kernel}


# ==================================================================================================
# Tiles: (kernel, dtype class, head-dim bucket, BLOCK_S) -> "sm_80 tile | sm_90 tile" (one text: both),
# "-" where that arch is not served, and KV_RESIDENT (K and V held across the query loop, or re-read
# from L1/L2 per query block). Every entry is compiled by tests/aot/small.py for sm_80 and sm_90 with
# triton 3.6 and 3.9 (no stack frame, no spills, shared memory within the chip); a key (or arch)
# without an entry is not served (the classic kernels run). Held in registers, K, V and the backward's
# dK, dV accumulators cost more than their size (mma operand layouts), so BLOCK_S is what limits.
# ==================================================================================================
SEQ_BUCKETS = (64, 128, 256)


def seq_bucket(s: int) -> int:
    """BLOCK_S: the keys a program holds, a power of two >= S (at least 64)."""
    return max(64, 1 << (s - 1).bit_length())


_TILES = {
    ("small_fwd", "f16", 32, 64): ("16x64 w4 s1", True),
    ("small_fwd", "f16", 32, 128): ("16x128 w4 s1", True),
    ("small_fwd", "f16", 32, 256): ("16x256 w4 s1", True),
    ("small_bwd", "f16", 32, 64): ("16x64 w4 s1", True),
    ("small_bwd", "f16", 32, 128): ("16x128 w4 s1", True),
    ("small_bwd", "f16", 32, 256): ("- | 16x256 w8 s1", True),  # sm_80: 24-32 B of stack at every tile tried
    ("small_fwd", "f16", 64, 64): ("16x64 w4 s1", True),
    ("small_fwd", "f16", 64, 128): ("16x128 w4 s1", True),
    ("small_fwd", "f16", 64, 256): ("16x256 w8 s1", True),
    ("small_bwd", "f16", 64, 64): ("16x64 w4 s1", True),
    ("small_bwd", "f16", 64, 128): ("16x128 w8 s1", True),  # S = 256 at hd 64: the dK/dV accumulators alone
}                                                            # are 128 KB of registers
# fp32: tf32 (mma) only. True fp32 (ieee: FMA products) spills at every tile tried, triton 3.9:
# forward 16x128 w4 4.8-10 KB of stack, backward 16x64 w4 2.4 KB, 16x128 w8 7 KB; the classic kernels serve it.
_TILES.update({
    ("small_fwd", "tf32", 32, 64): ("16x64 w4 s1", True),
    ("small_fwd", "tf32", 32, 128): ("16x128 w4 s1", True),
    ("small_fwd", "tf32", 32, 256): ("16x256 w8 s1", True),
    ("small_bwd", "tf32", 32, 64): ("16x64 w4 s1", True),
    ("small_bwd", "tf32", 32, 128): ("16x128 w8 s1", True),
})


def _per_arch(text: str) -> dict:
    parts = [x.strip() for x in text.split("|")]
    parts = parts * 2 if len(parts) == 1 else parts
    return {arch: (None if x == "-" else configs.parse(x)) for arch, x in zip(configs.ARCH_FAMILIES, parts)}


# (kernel, dtype class, head-dim bucket, BLOCK_S, arch family) -> (Tile, KV_RESIDENT)
TILES: dict = {key + (arch,): (tile, res) for key, (text, res) in _TILES.items()
               for arch, tile in _per_arch(text).items() if tile is not None}
INTERPRET_ARCH = 90  # under the interpreter, what is served is what sm_90 serves


def compile_cases() -> list:
    """Every (kernel, dtype class, head-dim bucket, BLOCK_S, arch, Tile, KV_RESIDENT) a launch can choose."""
    return [key + value for key, value in TILES.items()]


# ==================================================================================================
# Launchers. Inputs as kernels.attention.attention_forward/attention_backward's (checked by fastattn's
# API). Per call: one dict lookup (the decision, cached per signature and device, with the dummy
# tensors that stand in for absent arguments), the outputs' allocation, one launch.
# ==================================================================================================
_DECISIONS: dict = {}
INTERPRET_KV_RESIDENT = True  # the tests switch it to run the other load path


def _decide(kernel, q, k, v, device):
    """(tile, constexprs, dummies) of a launch, or None when this path does not serve it."""
    tf32 = q.dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32)
    l, s, e, ev = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    res = None
    if (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= s <= MAX_S and 1 <= l <= MAX_L
            and 1 <= e <= 256 and 1 <= ev <= 256 and (q.is_cuda or INTERPRET)):
        hd = max(configs.head_dim_bucket(e), configs.head_dim_bucket(ev))
        dc = configs.dtype_class(q.dtype, tf32)
        arch = INTERPRET_ARCH if INTERPRET else configs.device_arch(device)
        entry = TILES.get((kernel, dc, hd, seq_bucket(s), arch))
        if INTERPRET and entry is not None:  # the table decides what is served; the interpreter runs small tiles
            entry = (configs.Tile(16, max(16, 1 << (s - 1).bit_length()), 1, 1), INTERPRET_KV_RESIDENT)
        if entry is not None:
            tile, resident = entry
            dummies = (torch.zeros(4, dtype=torch.float32, device=device),   # mask
                       torch.zeros(16, dtype=torch.uint8, device=device),    # key padding
                       torch.zeros(2, dtype=torch.int64, device=device))     # seed
            res = (tile, dict(BLOCK_M=tile.block_m, BLOCK_S=tile.block_n, BLOCK_D=hd, BLOCK_DV=hd,
                              INPUT_PRECISION=configs.input_precision(dc), KV_RESIDENT=resident,
                              num_warps=tile.num_warps, num_stages=tile.num_stages), dummies)
    return res


def _serves(kernel, q, k, v, attn_mask):
    """The cached decision for this call, or None. A mask whose offsets within one (batch, head) do
    not fit int32 (the kernels' element offsets) is declined."""
    if not ENABLED:
        return None
    device = q.device
    key = (kernel, q.dtype, q.shape[2], k.shape[2], q.shape[3], v.shape[3], device,
           q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)
    try:
        d = _DECISIONS[key]
    except KeyError:
        d = _DECISIONS[key] = None if q.numel() == 0 or k.numel() == 0 else _decide(kernel, q, k, v, device)
    if d is not None and attn_mask is not None:
        st = attn_mask.stride()
        if (q.shape[2] - 1) * abs(st[2]) + (k.shape[2] - 1) * abs(st[3]) >= 2 ** 31:
            return None
    return d


def _args(d, attn_mask, key_padding_mask, dropout_p, seed, device):
    """(mask, its strides, kpm as u8, seed tensor): nothing is made but a CPU seed's device copy."""
    mask, kpm, sd = d[2]
    ms = (0, 0, 0, 0)
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dtype == torch.float32 else attn_mask.float()
        ms = mask.stride()
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(torch.uint8)
    if dropout_p > 0.0:
        sd = seed_offset_tensor(seed, device)
    return mask, ms, kpm, sd


def forward(q, k, v, attn_mask, key_padding_mask, dropout_p: float, is_causal: bool, scale: float, seed):
    """(out, lse) from the small kernel, or None when it does not serve the call."""
    d = _serves("small_fwd", q, k, v, attn_mask)
    if d is None:
        return None
    n, hq, l, e = q.shape
    hkv, s, ev = k.shape[1], k.shape[2], v.shape[3]
    device = q.device
    out = torch.empty((n, hq, l, ev), dtype=q.dtype, device=device)
    lse = torch.empty((n, hq, l), dtype=torch.float32, device=device)
    dropout_p = float(dropout_p)
    mask, ms, kpm, sd = _args(d, attn_mask, key_padding_mask, dropout_p, seed, device)
    _small_fwd_kernel[(n * hq,)](
        q, k, v, out, lse, mask, kpm, sd, dropout_p, float(scale), ms[0], ms[1], ms[2], ms[3],
        hq, hq // hkv, l, s, e, ev, bool(is_causal), key_padding_mask is not None, attn_mask is not None,
        dropout_p > 0.0, **d[1])
    CALLS["fwd"] += 1
    return out, lse


def backward(grad_out, q, k, v, out, lse, attn_mask, key_padding_mask, dropout_p: float, is_causal: bool,
             scale: float, seed):
    """(dq, dk, dv) from the small kernel (one launch), or None when it does not serve the call. out and
    lse are not read: the program recomputes the exact softmax from its resident keys."""
    d = _serves("small_bwd", q, k, v, attn_mask)
    if d is None:
        return None
    n, hq, l, e = q.shape
    hkv, s, ev = k.shape[1], k.shape[2], v.shape[3]
    device = q.device
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dropout_p = float(dropout_p)
    mask, ms, kpm, sd = _args(d, attn_mask, key_padding_mask, dropout_p, seed, device)
    _small_bwd_kernel[(n * hkv,)](
        q, k, v, grad_out, dq, dk, dv, mask, kpm, sd, dropout_p, float(scale), ms[0], ms[1], ms[2], ms[3],
        hq, hq // hkv, l, s, e, ev, bool(is_causal), key_padding_mask is not None, attn_mask is not None,
        dropout_p > 0.0, **d[1])
    CALLS["bwd"] += 1
    return dq, dk, dv
