"""Fused feed-forward block in Triton: Linear -> activation -> dropout -> Linear, forward and backward.

Shapes (fastattn/backends/README.md is the contract):
    x (T, D) contiguous, w1 (F, D), b1 (F,) or None, w2 (D2, F), b2 (D2,) or None (nn.Linear layout)
    hidden H = dropout(act(x @ w1^T + b1)), out = H @ w2^T + b2 (T, D2)
    activation: "relu" | "gelu" (exact erf) | "gelu_tanh"
    dropout: hidden element (t, f) kept iff tl.rand(seed, offset + t*F + f) >= p (int64 counter; seed and
    offset an int64 (2,) tensor the kernels read on the device), kept values
    scaled by 1/(1-p). fastattn/_philox.py draws the same bits on the host.

Kernels (three layers, as in Liger-Kernel: ``_ffn_*_kernel`` programs, ``ffn_forward``/``ffn_backward``
launchers, the op registration lives in fastattn/feed_forward.py):

    forward   _ffn_up_kernel      pre = x @ w1^T + b1; H = dropout(act(pre)) in the epilogue; one store
                                  of H (plus one of pre only when the backward needs it)
              _ffn_linear_kernel  out = H @ w2^T + b2 (bias fused)
    backward  _ffn_dh_kernel      dH = dOut @ w2; epilogue: dPre = dH * keep/(1-p) * act'(pre), the
                                  per-32-row column sums of dPre (-> db1, deterministic two-pass) and,
                                  when chosen, H itself (see below)
              _ffn_linear_kernel  dW2 = dOut^T @ H, H either read or recomputed from pre in the
                                  B-operand prologue (act applied to each loaded tile; see below)
              _ffn_linear_kernel  dW1 = dPre^T @ x ;  dx = dPre @ w1
              _ffn_colsum_kernel  db2 = colsum(dOut) and the second pass of db1 (fixed order)

No atomics anywhere: every output element is written by exactly one program and every reduction has a
fixed order, and the tile is a table lookup (kernels/configs.py, no timing), so a call is bitwise
reproducible across processes on one GPU model.

Save or recompute the pre-activation (decision: SAVE it, the contract's ``saved``)
    Recomputing pre = x @ w1^T + b1 in the backward is a whole GEMM of 2*T*D*F flops. For BERT-base
    (D=768, F=3072) and T=64k tokens that is 0.31 TFLOP, about 0.45 ms at ~700 TFLOP/s on an H100, i.e.
    one of the six GEMMs of forward+backward (~17% of the time). Saving it costs T*F*2 bytes = 384 MiB
    in bf16 at that size; torch eager keeps 2.5x that (linear2's input H, the activation's input or
    output, the bool dropout mask: 5 bytes per hidden element). The mask is never stored: it is
    regenerated from the counter. So we save pre (time wins; memory stays at 40% of eager), and
    fastattn/feed_forward.py's autograd recomputes it with F.linear when a forward ran with save_for_backward=False.

Recompute H in dW2's prologue, or write it from dH's epilogue (decision: per call, ``_h_in_prologue``)
    dW2 = dOut^T @ H needs H = dropout(act(pre)). The dH epilogue already has act(pre) and the mask
    for every (t, f) once, so writing H there costs one extra T*F store (and a T*F temporary).
    Recomputing H inside dW2's B-operand loads costs the activation (and Philox) once per M-tile of
    dW2, i.e. ceil(D2 / BLOCK_M) times per element. Per hidden element, in H100 CUDA-core instruction
    slots (128/clk/SM): dW2's tensor-core work for one M-tile of 128 rows ~ 8 slots; the H store from
    the dH epilogue ~ 18 slots (2 B at ~14 B/clk/SM of HBM bandwidth); the recompute per M-tile:
    relu ~2, gelu_tanh ~15, gelu (erf) ~25, Philox-4x32-10 dropout ~70. So the prologue is cheaper
    only when (act + dropout cost) * ceil(D2/128) < 18: relu without dropout up to D2 = 1024 (covers
    768), gelu_tanh without dropout for D2 <= 128; with dropout never (one Philox per M-tile already
    costs 4x the store), so the prologue has no dropout code at all. It is also 16-bit only: with
    true-fp32 operands (FMA dot) the activation on the B operand spills registers (AOT-checked), and
    fp32 is the accuracy path. Everything else writes H from the dH epilogue. Both paths are tested.

Tiles (kernels/configs.py; the AOT test compiles every one for sm_80 and sm_90 with triton 3.6 and 3.9)
    Keyed by (kernel, dtype class, alignment, output size, arch). Aligned problems (every leading
    dimension a multiple of 16, 768/3072, 4096/16384) get 128-wide tiles on large outputs, with the
    epilogue of the up and dH kernels split in two column halves (their Philox/activation epilogue
    on a full 128x128 tile held by 8 warps spills), 64-wide tiles on small outputs; grouped tile
    ordering (GROUP_M=8) keeps B tiles in L2. Unaligned problems (d_model 100, 97) load without
    vectorisation and without shared-memory pipelining, which costs registers, so they get 32-deep K
    tiles. fp32 (true fp32 via input_precision="ieee" unless torch.backends.cuda.matmul.allow_tf32)
    uses 8 warps. The activation is a runtime argument (one compiled kernel serves
    relu/gelu/gelu_tanh; the branch is uniform), so the number of compiled variants stays small.
    Nothing here queries a GPU at import time.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from ._seed import seed_offset_tensor
from .configs import INTERPRET

# Two bfloat16 defects of the triton 3.9 interpreter, worked around only when interpreting (compiled
# kernels never take these branches): tl.dot returns garbage for bf16 operands, so the GEMM tiles
# upcast them to fp32 first (exact: products of bf16 values are exact in fp32, as on the tensor cores);
# and fp32 -> bf16 casts truncate instead of rounding to nearest even as the GPU does (cvt.rn), so
# _cast rounds the fp32 bits to nearest even first.
_INTERPRETER_BF16_WORKAROUNDS = tl.constexpr(INTERPRET)

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
ACT_ID = {"relu": 0, "gelu": 1, "gelu_tanh": 2}


# Tiles come from kernels/configs.py (configs.ffn_config: a table lookup keyed on the kernel, dtype
# class, alignment, output size and arch; no timing). Every BLOCK_M there is a multiple of DB1_ROWS
# (the row granule of db1's partial sums, see _ffn_dh_kernel); the assert below holds the tables to it.

# The column-sum kernel has one fixed tile (its summation order must not depend on anything else).
COLSUM_BLOCK_R = 32
COLSUM_BLOCK_C = 32 if INTERPRET else 128
COLSUM_NUM_WARPS = 4
COLSUM_ROWS_PER_PROG = 256 if INTERPRET else 1024
DB1_ROWS = 32  # db1 partial sums: one fp32 row per DB1_ROWS rows of the hidden, whatever the tile
assert all(t.block_m % DB1_ROWS == 0 for k, t in configs.FFN.items() if k[0] == "dh")

# The operand layouts each _ffn_linear_kernel launch uses (A_TRANS: A is stored (K, M); B_TRANS: B is
# stored (N, K)); B_FROM_PRE launches take the "prologue" tiles, the others the "linear" ones. The launchers
# index this table, so the AOT test enumerates exactly what can run.
LINEAR_ROLES = {
    "down": dict(A_TRANS=False, B_TRANS=True, B_FROM_PRE=False),   # out = H @ w2^T
    "dw2": dict(A_TRANS=True, B_TRANS=False, B_FROM_PRE=False),    # dW2 = dOut^T @ H
    "dw2_recompute": dict(A_TRANS=True, B_TRANS=False, B_FROM_PRE=True),  # ... H from pre in the prologue
    "dw1": dict(A_TRANS=True, B_TRANS=False, B_FROM_PRE=False),    # dW1 = dPre^T @ x
    "dx": dict(A_TRANS=False, B_TRANS=False, B_FROM_PRE=False),    # dx = dPre @ w1
}


# ---- device helpers ----------------------------------------------------------------------------------
@triton.jit
def _cast(x, dtype: tl.constexpr):
    """fp32 tile -> dtype, rounding to nearest even (see _INTERPRETER_BF16_WORKAROUNDS)."""
    if _INTERPRETER_BF16_WORKAROUNDS:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _tanh(u):
    # overflow-free tanh: exp of a non-positive argument only
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _act_fwd(x, act):
    """activation of an fp32 tile: act 0 relu, 1 gelu (erf), 2 gelu (tanh approximation)."""
    if act == 0:
        y = tl.where(x <= 0.0, 0.0, x)  # NaN stays NaN, as torch.relu
    elif act == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    else:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + _tanh(u))
    return y


@triton.jit
def _act_grad(x, act):
    """d act(x) / dx of an fp32 tile (relu'(0) = 0, as torch)."""
    if act == 0:
        d = tl.where(x <= 0.0, 0.0, 1.0)  # NaN passes the gradient, as torch
    elif act == 1:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
        d = cdf + x * pdf
    else:
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        t = _tanh(u)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)
    return d


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles at a time so B tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _gemm_tile(a_ptr, b_ptr, M, N, K, lda, ldb, pid_m, pid_n,
               A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, B_FROM_PRE: tl.constexpr, act,
               INPUT_PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A @ B.

    A element (m, k) sits at m*lda + k, or at k*lda + m when A_TRANS; B element (k, n) at k*ldb + n, or
    at n*ldb + k when B_TRANS. Loads are masked (rows/columns past M/N and the K tail read as 0;
    BLOCK_K >= 16 whatever K is, as tl.dot needs). Masks rather than wrapped indices, so that when the
    JIT sees M/N/K divisible by 16 the masks are constant over 16 elements and the loads along the
    contiguous dimension (m for A_TRANS, n for B (K, N)) stay vectorised. B_FROM_PRE: B holds the
    pre-activation and the operand is act(B) (no dropout: see _h_in_prologue).
    """
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    if A_TRANS:
        a_ptrs = a_ptr + rk[None, :].to(tl.int64) * lda + rm[:, None]
        a_step = BLOCK_K * lda
    else:
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * lda + rk[None, :]
        a_step = BLOCK_K
    if B_TRANS:
        b_ptrs = b_ptr + rn[None, :].to(tl.int64) * ldb + rk[:, None]
        b_step = BLOCK_K
    else:
        b_ptrs = b_ptr + rk[:, None].to(tl.int64) * ldb + rn[None, :]
        b_step = BLOCK_K * ldb
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if B_FROM_PRE:
            b = _cast(_act_fwd(b.to(tl.float32), act), a.dtype)  # act(0) == 0 keeps the K tail at 0
        if _INTERPRETER_BF16_WORKAROUNDS:
            if a.dtype == tl.bfloat16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc


@triton.jit
def _up_epilogue(acc, offs_m, offs_n, b1_ptr, h_ptr, pre_ptr, T, F, seed, p, drop_scale, has_bias, store_pre,
                 act):
    n_ok = offs_n < F
    ok = (offs_m < T)[:, None] & n_ok[None, :]
    if has_bias != 0:
        acc += tl.load(b1_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    pre = _cast(acc, h_ptr.dtype.element_ty)
    off = offs_m[:, None].to(tl.int64) * F + offs_n[None, :]  # memory offset == dropout counter
    if store_pre != 0:
        tl.store(pre_ptr + off, pre, mask=ok)
    h = _act_fwd(pre.to(tl.float32), act)  # from the rounded pre, exactly what the backward sees
    if p > 0.0:
        h = tl.where(tl.rand(tl.load(seed), tl.load(seed + 1) + off) >= p, h * drop_scale, 0.0)
    tl.store(h_ptr + off, _cast(h, h_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed", "has_bias", "store_pre", "act"])
def _ffn_up_kernel(
    x_ptr,      # (T, D) input
    w1_ptr,     # (F, D) up weight
    b1_ptr,     # (F,) up bias (read only when has_bias)
    h_ptr,      # (T, F) out: hidden after activation and dropout
    pre_ptr,    # (T, F) out: pre-activation (written only when store_pre)
    T, F, D,
    seed,       # *i64: (Philox key, counter offset), read on the device
    p,          # dropout probability (no dropout when 0)
    drop_scale,  # 1 / (1 - p)
    has_bias, store_pre,
    act,        # 0 relu, 1 gelu, 2 gelu_tanh
    INPUT_PRECISION: tl.constexpr, EPI_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(T, F, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _gemm_tile(x_ptr, w1_ptr, T, F, D, D, D, pid_m, pid_n, False, True, False, 0, INPUT_PRECISION,
                     BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if EPI_SPLIT == 1:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _up_epilogue(acc, offs_m, offs_n, b1_ptr, h_ptr, pre_ptr, T, F, seed, p, drop_scale, has_bias, store_pre,
                     act)
    else:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _up_epilogue(acc0, offs_m, offs_n, b1_ptr, h_ptr, pre_ptr, T, F, seed, p, drop_scale, has_bias,
                     store_pre, act)
        _up_epilogue(acc1, offs_m, offs_n + BLOCK_N // 2, b1_ptr, h_ptr, pre_ptr, T, F, seed, p, drop_scale,
                     has_bias, store_pre, act)


@triton.jit(do_not_specialize=["has_bias", "act"])
def _ffn_linear_kernel(
    a_ptr,      # A operand, (M, K) or (K, M) when A_TRANS
    b_ptr,      # B operand, (K, N) or (N, K) when B_TRANS; the pre-activation (T, F) when B_FROM_PRE
    bias_ptr,   # (N,) added to every row (read only when has_bias)
    c_ptr,      # (M, N) out, contiguous
    M, N, K, lda, ldb,
    has_bias,
    act,        # activation of the recomputed B (B_FROM_PRE only)
    A_TRANS: tl.constexpr, B_TRANS: tl.constexpr, B_FROM_PRE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _gemm_tile(a_ptr, b_ptr, M, N, K, lda, ldb, pid_m, pid_n, A_TRANS, B_TRANS, B_FROM_PRE, act,
                     INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if has_bias != 0:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptr + off, _cast(acc, c_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _dh_epilogue(acc, offs_m, offs_n, pid_m, pre_ptr, dpre_ptr, h_ptr, db1p_ptr, T, F, seed, p, drop_scale,
                 store_h, act, DB1_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, SUB_N: tl.constexpr):
    n_ok = offs_n < F
    ok = (offs_m < T)[:, None] & n_ok[None, :]
    off = offs_m[:, None].to(tl.int64) * F + offs_n[None, :]
    pre = tl.load(pre_ptr + off, mask=ok, other=0.0).to(tl.float32)
    mult = tl.full(acc.shape, 1.0, tl.float32)
    if p > 0.0:
        mult = tl.where(tl.rand(tl.load(seed), tl.load(seed + 1) + off) >= p, drop_scale, 0.0)
    dpre = tl.where(ok, acc * mult * _act_grad(pre, act), 0.0)
    tl.store(dpre_ptr + off, _cast(dpre, dpre_ptr.dtype.element_ty), mask=ok)
    # db1 partials: one row per DB1_ROWS rows of the hidden, a layout that does not depend on BLOCK_M
    part = tl.sum(tl.reshape(dpre, (BLOCK_M // DB1_ROWS, DB1_ROWS, SUB_N)), axis=1)
    prow = pid_m * (BLOCK_M // DB1_ROWS) + tl.arange(0, BLOCK_M // DB1_ROWS)
    p_ok = (prow < tl.cdiv(T, DB1_ROWS))[:, None] & n_ok[None, :]
    tl.store(db1p_ptr + prow[:, None].to(tl.int64) * F + offs_n[None, :], part, mask=p_ok)
    if store_h != 0:
        h = _act_fwd(pre, act) * mult
        tl.store(h_ptr + off, _cast(h, h_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["seed", "store_h", "act"])
def _ffn_dh_kernel(
    go_ptr,     # (T, D2) grad of the output
    w2_ptr,     # (D2, F) down weight
    pre_ptr,    # (T, F) saved pre-activation
    dpre_ptr,   # (T, F) out: grad of the pre-activation
    h_ptr,      # (T, F) out: hidden dropout(act(pre)) (written only when store_h)
    db1p_ptr,   # (cdiv(T, DB1_ROWS), F) fp32 out: column sums of dPre per DB1_ROWS rows
    T, F, D2,
    seed, p, drop_scale,
    store_h,
    act,        # 0 relu, 1 gelu, 2 gelu_tanh
    INPUT_PRECISION: tl.constexpr, DB1_ROWS: tl.constexpr, EPI_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(T, F, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _gemm_tile(go_ptr, w2_ptr, T, F, D2, D2, F, pid_m, pid_n, False, False, False, 0, INPUT_PRECISION,
                     BLOCK_M, BLOCK_N, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if EPI_SPLIT == 1:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _dh_epilogue(acc, offs_m, offs_n, pid_m, pre_ptr, dpre_ptr, h_ptr, db1p_ptr, T, F, seed, p, drop_scale,
                     store_h, act, DB1_ROWS, BLOCK_M, BLOCK_N)
    else:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _dh_epilogue(acc0, offs_m, offs_n, pid_m, pre_ptr, dpre_ptr, h_ptr, db1p_ptr, T, F, seed, p,
                     drop_scale, store_h, act, DB1_ROWS, BLOCK_M, BLOCK_N // 2)
        _dh_epilogue(acc1, offs_m, offs_n + BLOCK_N // 2, pid_m, pre_ptr, dpre_ptr, h_ptr, db1p_ptr, T, F, seed,
                     p, drop_scale, store_h, act, DB1_ROWS, BLOCK_M, BLOCK_N // 2)


@triton.jit
def _ffn_colsum_kernel(
    x_ptr,      # (R, C) contiguous
    out_ptr,    # (cdiv(R, rows_per_prog), C) out: sums of each chunk of rows_per_prog rows
    R, C, rows_per_prog,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    r_start = pid_r * rows_per_prog
    r_end = tl.minimum(R, r_start + rows_per_prog)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        ptrs = x_ptr + rows[:, None].to(tl.int64) * C + cols[None, :]
        acc += tl.load(ptrs, mask=(rows < r_end)[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_r.to(tl.int64) * C + cols, _cast(tl.sum(acc, axis=0), out_ptr.dtype.element_ty),
             mask=c_ok)


# ---- host launchers ----------------------------------------------------------------------------------
def _alignment(tensors, sizes) -> str:
    """"aligned" when every pointer is 16-byte aligned and every address-forming size a multiple of 16
    (what triton's JIT specialises on), else "unaligned"."""
    ok = all(t.data_ptr() % 16 == 0 for t in tensors if t is not None) and all(n % 16 == 0 for n in sizes)
    return "aligned" if ok else "unaligned"


def _launch(kernel: str, fn, x: torch.Tensor, align: str, m: int, n: int, *args, **constexprs):
    """Launch fn on an (m, n) output with the tile configs.ffn_config chooses for it."""
    dc = configs.dtype_class(x.dtype)
    arch = 80 if configs.INTERPRET or not x.is_cuda else configs.device_arch(x.device)
    t = configs.ffn_config(kernel, dc, align, m, n, arch)
    fn[(triton.cdiv(m, t.block_m) * triton.cdiv(n, t.block_n),)](
        *args, INPUT_PRECISION=configs.input_precision(dc), **constexprs, **t.kwargs,
        num_warps=t.num_warps, num_stages=t.num_stages)


# The launchers trust the call: fastattn's Python API has validated shapes, dtypes, devices, the
# activation name and dropout_p; the asserts only guard the launchers' own assumptions.
def _seed_value(dropout_p: float, seed: Optional[torch.Tensor], device) -> torch.Tensor:
    """int64 (2,) (Philox seed, counter offset) on `device`, read by the kernels themselves."""
    if dropout_p == 0.0:
        return torch.empty(2, dtype=torch.int64, device=device)  # never read
    return seed_offset_tensor(seed, device)


def _sizes(x, w1, w2) -> tuple[int, int, int, int]:
    assert x.dim() == 2 and x.is_contiguous() and w1.shape[1] == x.shape[1] and w2.shape[1] == w1.shape[0]
    return x.shape[0], x.shape[1], w1.shape[0], w2.shape[0]


def _device_of(t: torch.Tensor):
    """The launches run on t's CUDA device (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _linear(role: str, a, b, bias, c, m, n, k, lda, ldb, act: str = "relu"):
    """c (m, n) = A @ B (+ bias) with the operand layouts of LINEAR_ROLES[role]."""
    flags = LINEAR_ROLES[role]
    kernel = "prologue" if flags["B_FROM_PRE"] else "linear"
    align = _alignment((a, b, bias, c), (m, n, k, lda, ldb) if flags["A_TRANS"] else (n, k, lda, ldb))
    _launch(kernel, _ffn_linear_kernel, c, align, m, n,
            a, b, bias if bias is not None else c, c, m, n, k, lda, ldb, int(bias is not None),
            ACT_ID[act] if flags["B_FROM_PRE"] else 0, **flags)


def _colsum(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """column sums of a contiguous (R, C) tensor, fp32 accumulation in a fixed order."""
    r, c = x.shape
    if r == 0:
        return torch.zeros(c, dtype=out_dtype, device=x.device)
    while True:
        chunks = triton.cdiv(r, COLSUM_ROWS_PER_PROG)
        out = torch.empty((chunks, c), dtype=out_dtype if chunks == 1 else torch.float32, device=x.device)
        _ffn_colsum_kernel[(triton.cdiv(c, COLSUM_BLOCK_C), chunks)](
            x, out, r, c, COLSUM_ROWS_PER_PROG, BLOCK_R=COLSUM_BLOCK_R, BLOCK_C=COLSUM_BLOCK_C,
            num_warps=COLSUM_NUM_WARPS)
        if chunks == 1:
            return out.reshape(c)
        x, r = out, chunks


def _h_in_prologue(activation: str, dropout_p: float, d2: int, dtype: torch.dtype) -> bool:
    """True: dW2 recomputes H from pre in its prologue; False: the dH epilogue writes H (module doc).

    16-bit only: with fp32 operands in true fp32 (FMA) the activation on the B operand's dot layout
    spills registers, and fp32 is the accuracy path, where one extra T*F store does not matter."""
    if dropout_p > 0.0 or dtype not in (torch.float16, torch.bfloat16):
        return False
    m_tiles = triton.cdiv(d2, 128)
    return (activation == "relu" and m_tiles <= 8) or (activation == "gelu_tanh" and m_tiles <= 1)


def ffn_forward(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], activation: str, dropout_p: float, seed: Optional[torch.Tensor],
                save_for_backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """out = dropout(act(x @ w1^T + b1)) @ w2^T + b2.

    x (T, D) contiguous, w1 (F, D), b1 (F,) or None, w2 (D2, F), b2 (D2,) or None, one dtype/device.
    seed: int64 tensor, (1,) seed or (2,) (seed, counter offset) (None when dropout_p == 0).
    Returns (out (T, D2), saved): saved is the pre-activation (T, F) in x's dtype when
    save_for_backward, else an empty (0,) tensor.
    """
    t, d, f, d2 = _sizes(x, w1, w2)
    seed_v = _seed_value(dropout_p, seed, x.device)
    w1, w2 = w1.contiguous(), w2.contiguous()
    b1 = b1.contiguous() if b1 is not None else None
    b2 = b2.contiguous() if b2 is not None else None
    out = torch.empty((t, d2), dtype=x.dtype, device=x.device)
    saved = (torch.empty((t, f), dtype=x.dtype, device=x.device) if save_for_backward
             else torch.empty(0, dtype=x.dtype, device=x.device))
    if t == 0:
        return out, saved
    p = float(dropout_p)
    scale = 1.0 / (1.0 - p)
    h = torch.empty((t, f), dtype=x.dtype, device=x.device)
    with _device_of(x):
        align = _alignment((x, w1, b1, h, saved), (f, d))
        _launch("up", _ffn_up_kernel, x, align, t, f,
                x, w1, b1 if b1 is not None else h, h, saved if save_for_backward else h, t, f, d,
                seed_v, p, scale, int(b1 is not None), int(save_for_backward), ACT_ID[activation])
        _linear("down", h, w2, b2, out, t, d2, f, f, f)
    return out, saved


def ffn_backward(grad_out: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                 w2: torch.Tensor, b2: Optional[torch.Tensor], saved: torch.Tensor, activation: str,
                 dropout_p: float, seed: Optional[torch.Tensor], *, h_in_prologue: Optional[bool] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ffn_forward.

    grad_out (T, D2), saved: the (T, F) pre-activation from ffn_forward(save_for_backward=True).
    Returns dx (T, D), dw1 (F, D), db1 (F,), dw2 (D2, F), db2 (D2,) (db1/db2 even without biases).
    h_in_prologue (tests only): force where dW2 gets H (None: the cost model in _h_in_prologue).
    """
    t, d, f, d2 = _sizes(x, w1, w2)
    assert tuple(grad_out.shape) == (t, d2) and tuple(saved.shape) == (t, f)
    seed_v = _seed_value(dropout_p, seed, x.device)
    grad_out, saved = grad_out.contiguous(), saved.contiguous()
    w1, w2 = w1.contiguous(), w2.contiguous()
    dt, dev = x.dtype, x.device
    if t == 0:
        return (torch.empty_like(x), torch.zeros_like(w1), torch.zeros(f, dtype=dt, device=dev),
                torch.zeros_like(w2), torch.zeros(d2, dtype=dt, device=dev))
    p = float(dropout_p)
    scale = 1.0 / (1.0 - p)
    prologue = _h_in_prologue(activation, p, d2, dt) if h_in_prologue is None else bool(h_in_prologue)
    # the dW2 prologue recomputes act(pre) without dropout, in 16-bit only
    assert not prologue or (p == 0.0 and dt in (torch.float16, torch.bfloat16))
    dpre = torch.empty((t, f), dtype=dt, device=dev)
    h = dpre if prologue else torch.empty((t, f), dtype=dt, device=dev)
    db1_part = torch.empty((triton.cdiv(t, DB1_ROWS), f), dtype=torch.float32, device=dev)
    dx = torch.empty((t, d), dtype=dt, device=dev)
    dw1 = torch.empty((f, d), dtype=dt, device=dev)
    dw2 = torch.empty((d2, f), dtype=dt, device=dev)
    with _device_of(x):
        align = _alignment((grad_out, w2, saved, dpre, h, db1_part), (f, d2))
        _launch("dh", _ffn_dh_kernel, x, align, t, f,
                grad_out, w2, saved, dpre, h, db1_part, t, f, d2, seed_v, p, scale, int(not prologue),
                ACT_ID[activation], DB1_ROWS=DB1_ROWS)
        if prologue:
            _linear("dw2_recompute", grad_out, saved, None, dw2, d2, f, t, d2, f, act=activation)
        else:
            _linear("dw2", grad_out, h, None, dw2, d2, f, t, d2, f)
        del h
        db2 = _colsum(grad_out, dt)
        db1 = _colsum(db1_part, dt)
        _linear("dw1", dpre, x, None, dw1, f, d, t, f, d)
        _linear("dx", dpre, w1, None, dx, t, d, f, f, d)
    return dx, dw1, db1, dw2, db2
