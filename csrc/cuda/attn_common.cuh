// Device helpers shared by the attention kernels: tensor-core fragments (mma.sync m16n8k16,
// ldmatrix), cp.async, element types, the score mask. CUDA headers only (+ ../philox.h).
#pragma once
#include <cfloat>
#include <cstdint>
#include <cmath>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../philox.h"
#include "attn_params.h"

namespace fastattn {
namespace cuda {

// Largest dynamic shared memory one block may opt into on sm_80 (163 KB); sm_90 allows 227 KB.
// Every tile configuration below static_asserts it fits the smaller.
constexpr size_t kMaxSmemSm80 = 166912;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element types -------------------------------------------------------------------------------
template <typename T>
struct TypeOps;

template <>
struct TypeOps<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

// The 16-bit types: T, its pair type T2 and CUDA's round-to-nearest conversions of them.
template <typename T, typename T2, float (*ToFloat)(T), T (*FromFloat)(float), T2 (*Pack)(float, float)>
struct TypeOps16 {
  static __device__ __forceinline__ float to_float(T x) { return ToFloat(x); }
  static __device__ __forceinline__ T from_float(float x) { return FromFloat(x); }
  // two floats -> one 32-bit register, `lo` in the low half (the lower column of a fragment)
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    T2 h = Pack(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <>
struct TypeOps<__half> : TypeOps16<__half, __half2, __half2float, __float2half_rn, __floats2half2_rn> {};
template <>
struct TypeOps<__nv_bfloat16>
    : TypeOps16<__nv_bfloat16, __nv_bfloat162, __bfloat162float, __float2bfloat16_rn, __floats2bfloat162_rn> {};

// ---- tensor cores ---------------------------------------------------------------------------------
// D (16x8 f32) += A (16x16, row) * B (16x8, col). Fragment layout (lane = 4*g + t):
//   a[0]: A[g][2t..2t+1]  a[1]: A[g+8][2t..]  a[2]: A[g][2t+8..]  a[3]: A[g+8][2t+8..]
//   b[0]: B[2t..2t+1][g]  b[1]: B[2t+8..][g]
//   c[0..1]: C[g][2t..2t+1]  c[2..3]: C[g+8][2t..2t+1]
// One instruction per element type; PTX_T is its PTX name (the asm text must be a literal).
#define FASTATTN_MMA_16816(PTX_T)                                                                          \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_T "." PTX_T ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, " \
               "{%8,%9}, {%0,%1,%2,%3};\n"                                                                 \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                           \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], const uint32_t b0, const uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma_16816: fp16 or bf16");
  if constexpr (std::is_same_v<T, __half>) {
    FASTATTN_MMA_16816("f16");
  } else {
    FASTATTN_MMA_16816("bf16");
  }
}
#undef FASTATTN_MMA_16816

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane l gives the row address of matrix l/8, row l%8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// This lane's row address for ldmatrix x4 of the 16x16 block at (row0, col0) of a smem tile with row
// stride lds: matrices 0..3 = rows 0-7 / 8-15 of columns 0-7, then of columns 8-15.
template <typename T>
__device__ __forceinline__ uint32_t block16_addr(const T* tile, int lds, int row0, int col0, int lane) {
  const int r = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int c = col0 + (lane >> 4) * 8;
  return smem_addr(tile + r * lds + c);
}

// A fragment of the 16x16 block at (row0, col0) of a row-major smem tile with row stride lds.
template <typename T>
__device__ __forceinline__ void load_a_frag(uint32_t a[4], const T* tile, int lds, int row0, int col0, int lane) {
  ldmatrix_x4(a, block16_addr(tile, lds, row0, col0, lane));
}

// B fragments of two n8 tiles (n0, n0+8) x k16 (k0) where the smem tile is stored [n][k] (row = n):
// b[0], b[1] for n0 and b[2], b[3] for n0 + 8.
template <typename T>
__device__ __forceinline__ void load_b_frag_nk(uint32_t b[4], const T* tile, int lds, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + (lane >> 4) * 8;
  const int c = k0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(b, smem_addr(tile + r * lds + c));
}

// Same fragments when the smem tile is stored [k][n] (row = k): ldmatrix with transpose.
template <typename T>
__device__ __forceinline__ void load_b_frag_kn(uint32_t b[4], const T* tile, int lds, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, block16_addr(tile, lds, k0, n0, lane));
}

// Zeroes an accumulator of n8 tiles.
template <int NC>
__device__ __forceinline__ void zero_acc(float (&c)[NC][4]) {
#pragma unroll
  for (int nn = 0; nn < NC; ++nn) c[nn][0] = c[nn][1] = c[nn][2] = c[nn][3] = 0.f;
}

// Row r (0: the thread's row g, 1: row g + 8) of a 16 x 8*NC accumulator, times scale, rounded to T,
// into columns [0, n) of `row` (global memory).
template <typename T, int NC>
__device__ __forceinline__ void store_acc_row(T* row, const float (&c)[NC][4], int r, float scale, int n, int tq) {
#pragma unroll
  for (int nn = 0; nn < NC; ++nn) {
    const int col = nn * 8 + 2 * tq;
    if (col < n) row[col] = TypeOps<T>::from_float(c[nn][2 * r] * scale);
    if (col + 1 < n) row[col + 1] = TypeOps<T>::from_float(c[nn][2 * r + 1] * scale);
  }
}

// C (16 x 8*NC: NC n8 tiles, NC even) = A B^T on tensor cores, both from shared memory: A the 16 rows
// from row0 of a tile stored [m][k], B a tile stored [n][k] (row stride lds for both), k < 16*KS;
// k steps from k_valid on (zero padding of the head dim) are skipped.
template <typename T, int KS, int NC>
__device__ __forceinline__ void mma_smem_abt(float (&c)[NC][4], const T* a_tile, int row0, const T* b_tile, int lds,
                                             int k_valid, int lane) {
  static_assert(NC % 2 == 0, "B fragments come in pairs of n8 tiles");
  zero_acc(c);
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    if (kk * 16 < k_valid) {
      uint32_t a[4];
      load_a_frag(a, a_tile, lds, row0, kk * 16, lane);
#pragma unroll
      for (int nn = 0; nn < NC; nn += 2) {
        uint32_t bf[4];
        load_b_frag_nk(bf, b_tile, lds, nn * 8, kk * 16, lane);
        mma_16816<T>(c[nn], a, bf[0], bf[1]);
        mma_16816<T>(c[nn + 1], a, bf[2], bf[3]);
      }
    }
  }
}

// C (16 x 8*NC: NC n8 tiles, NC even) += A B on tensor cores, where A (16 x 16*KS) is still in the
// fp32 accumulators of 2*KS n8 tiles of an earlier mma (scores, probabilities, dS): two adjacent
// accumulator tiles, rounded to T and packed in pairs, are exactly one A fragment. B (16*KS x 8*NC)
// is a shared-memory tile stored [k][n] with row stride lds; column tiles from n_valid on (zero
// padding of the head dim) are skipped.
template <typename T, int KS, int NC>
__device__ __forceinline__ void mma_acc_a(float (&c)[NC][4], const float (&acc)[2 * KS][4], const T* b_tile, int lds,
                                          int n_valid, int lane) {
  static_assert(NC % 2 == 0, "B fragments come in pairs of n8 tiles");
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[4];
    a[0] = TypeOps<T>::pack(acc[2 * kk][0], acc[2 * kk][1]);
    a[1] = TypeOps<T>::pack(acc[2 * kk][2], acc[2 * kk][3]);
    a[2] = TypeOps<T>::pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[3] = TypeOps<T>::pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
#pragma unroll
    for (int dn = 0; dn < NC; dn += 2) {
      if (dn * 8 < n_valid) {
        uint32_t bf[4];
        load_b_frag_kn(bf, b_tile, lds, kk * 16, dn * 8, lane);
        mma_16816<T>(c[dn], a, bf[0], bf[1]);
        mma_16816<T>(c[dn + 1], a, bf[2], bf[3]);
      }
    }
  }
}

// ---- cp.async ---------------------------------------------------------------------------------------
// 16 bytes global -> shared; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copy rows [row0, row0 + R) of a (nrows, ncols) row-major global matrix into a zero-padded
// R x D smem tile (row stride LDS). vec: ncols % 8 == 0 and 16-byte aligned rows -> cp.async;
// otherwise plain element loads (the caller's __syncthreads() publishes them either way).
template <typename T, int R, int D, int LDS, int NT>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int row0, int nrows, int ncols, bool vec, int tid) {
  constexpr int kChunks = D / 8;
  if (vec) {
#pragma unroll 4
    for (int c = tid; c < R * kChunks; c += NT) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool ok = (row0 + r < nrows) && (col < ncols);
      const T* src = ok ? g + static_cast<int64_t>(row0 + r) * ncols + col : g;
      cp_async_16(smem + r * LDS + col, src, ok);
    }
  } else {
    for (int c = tid; c < R * D; c += NT) {
      const int r = c / D, col = c % D;
      T x = TypeOps<T>::from_float(0.f);
      if (row0 + r < nrows && col < ncols) x = g[static_cast<int64_t>(row0 + r) * ncols + col];
      smem[r * LDS + col] = x;
    }
  }
}

// The K and V rows [row0, row0 + R) of one kv head into their smem tiles (see load_tile).
template <typename T, int R, int D, int LDS, int NT>
__device__ __forceinline__ void load_kv_tile(T* sk, T* sv, const T* k, const T* v, int row0, int S, int E, int Ev,
                                             bool vec_k, bool vec_v, int tid) {
  load_tile<T, R, D, LDS, NT>(sk, k, row0, S, E, vec_k, tid);
  load_tile<T, R, D, LDS, NT>(sv, v, row0, S, Ev, vec_v, tid);
}

__device__ __forceinline__ bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// ---- scores -----------------------------------------------------------------------------------------
// Everything that decides one score of (batch b, query head h): causal, key padding, additive mask.
template <typename T>
struct ScoreMask {
  const float* mask;  // float32, already offset to (b, h), or null
  int64_t sl, ss;
  const uint8_t* kpm;  // already offset to batch b, or null
  int L, S;
  bool causal;

  __device__ __forceinline__ ScoreMask(const AttnParams& p, int b, int h)
      : mask(p.mask), sl(p.mask_sl), ss(p.mask_ss), kpm(p.kpm), L(p.L), S(p.S),
        causal(p.causal) {
    if (mask) mask += b * p.mask_sb + h * p.mask_sh;
    if (kpm) kpm += static_cast<int64_t>(b) * p.S;
  }
  // Does the tile of queries [i0, i0+bm) x keys [j0, j0+bn) need per-element work?
  __device__ __forceinline__ bool tile_needs_mask(int i0, int bm, int j0, int bn) const {
    return mask != nullptr || kpm != nullptr || j0 + bn > S || i0 + bm > L || (causal && j0 + bn - 1 > i0);
  }
  // Natural-log score `s` (already scaled) after masking; -inf when (i, j) is not visible.
  __device__ __forceinline__ float apply(float s, int i, int j) const {
    if (i >= L || j >= S || (causal && j > i)) return -INFINITY;
    if (kpm && kpm[j]) return -INFINITY;
    if (mask) {  // only -inf excludes a key: set, not added (a NaN score + -inf would be NaN)
      const float mv = mask[i * sl + j * ss];
      s = mv == -INFINITY ? -INFINITY : s + mv;
    }
    return s;
  }
};

// One (batch, query head) bh of the problem, and the K and V rows of its kv head (GQA).
template <typename T>
struct QueryHead {
  int b, h, hkv;
  const T* k;  // (S, E)
  const T* v;  // (S, Ev)
  __device__ __forceinline__ QueryHead(const AttnParams& p, int bh)
      : b(bh / p.Hq), h(bh % p.Hq), hkv(h / (p.Hq / p.Hkv)),
        k(static_cast<const T*>(p.k) + static_cast<int64_t>(b * p.Hkv + hkv) * p.S * p.E),
        v(static_cast<const T*>(p.v) + static_cast<int64_t>(b * p.Hkv + hkv) * p.S * p.Ev) {}
};

// The query tile a block of the forward or dQ kernel owns: BM rows from the returned i0 of one
// (batch, head) bh; the last tiles of a head, whose causal rows are longest, are launched first.
template <int BM>
__device__ __forceinline__ int query_tile_of_block(const AttnParams& p, int& bh) {
  const int n_mblocks = (p.L + BM - 1) / BM;
  bh = blockIdx.x / n_mblocks;
  return (n_mblocks - 1 - blockIdx.x % n_mblocks) * BM;
}

// 1 / (1 - p), the scale of a kept element; 1 without dropout.
__device__ __forceinline__ float keep_scale_of(const AttnParams& p) {
  return p.dropout_p > 0.f ? 1.f / (1.f - p.dropout_p) : 1.f;
}

// A masked natural-log score in log2 units. A finite score stays finite (a mask of finfo.min times
// log2(e) would overflow to -inf and count as excluded): only -inf excludes a key. Scores beyond
// +-FLT_MAX / log2(e) saturate at +-FLT_MAX (their order among themselves is lost; the rest of the
// row is exact). NaN stays NaN.
__device__ __forceinline__ float to_log2(float s) {
  const float x = s * kLog2e;
  return isfinite(s) ? fminf(fmaxf(x, -FLT_MAX), FLT_MAX) : x;
}

// Is any key of [j0, j0+bn) not padded? Block-uniform; every thread of the block must call it.
__device__ __forceinline__ bool key_tile_live(const uint8_t* kpm_b, int j0, int bn, int S) {
  if (kpm_b == nullptr) return j0 < S;
  int live = 0;
  for (int j = j0 + static_cast<int>(threadIdx.x); j < j0 + bn && j < S; j += blockDim.x) live |= (kpm_b[j] == 0);
  return __syncthreads_or(live) != 0;
}

// First key tile >= t (of n_tiles tiles of bn keys) that has a key not padded. Block-uniform.
__device__ __forceinline__ int next_live_tile(const uint8_t* kpm_b, int t, int n_tiles, int bn, int S) {
  if (kpm_b == nullptr) return t;
  while (t < n_tiles && !key_tile_live(kpm_b, t * bn, bn, S)) ++t;
  return t;
}

// The K/V tiles one query tile visits (forward, dQ): BN keys at a time through two shared-memory
// buffers each (sK, sV: [2][BN][LDS], cp.async double buffering), in key order, tiles wholly covered
// by key_padding_mask skipped. Block-uniform; every thread of the block calls it.
template <typename T, int BN, int D, int LDS, int NT>
struct KvTiles {
  T* sK;
  T* sV;
  const T* k;  // (S, E) of the kv head
  const T* v;  // (S, Ev)
  const uint8_t* kpm;  // of the batch row, or null
  int n_tiles, S, E, Ev;
  bool vec_k, vec_v;

  __device__ __forceinline__ const T* k_buf(int buf) const { return sK + buf * BN * LDS; }
  __device__ __forceinline__ const T* v_buf(int buf) const { return sV + buf * BN * LDS; }
  __device__ __forceinline__ void load(int t, int buf, int tid) const {
    load_kv_tile<T, BN, D, LDS, NT>(sK + buf * BN * LDS, sV + buf * BN * LDS, k, v, t * BN, S, E, Ev, vec_k, vec_v,
                                    tid);
  }
  // The first live tile (n_tiles when none), its loads into buffer 0 committed with those issued before.
  __device__ __forceinline__ int first(int tid) const {
    const int t = next_live_tile(kpm, 0, n_tiles, BN, S);
    if (t < n_tiles) load(t, 0, tid);
    cp_async_commit();
    return t;
  }
  // Issues the loads of the next live tile after t into the other buffer, waits until tile t is in
  // buffer buf, and returns the next tile.
  __device__ __forceinline__ int prefetch_next(int t, int buf, int tid) const {
    const int t_next = next_live_tile(kpm, t + 1, n_tiles, BN, S);
    if (t_next < n_tiles) load(t_next, buf ^ 1, tid);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    return t_next;
  }
};

__device__ __forceinline__ bool dropout_keep(uint64_t seed, uint64_t counter, float p) {
  return philox_uniform(seed, counter) >= p;
}

// Keep bits of the n <= 32 accumulator elements of one mma fragment row-block (bit idx = 4*nn + e,
// element (row0 + 8*(e>>1), col0 + 8*nn + (e&1)), counter base + row*row_stride + col*col_stride:
// (ld, 1) for a row-major (.., ld) problem, (1, ld) for the transposed one of the dK/dV kernel).
// A rolled loop: Philox runs once per element without unrolling 10 rounds x 32 elements in registers.
__device__ __forceinline__ uint32_t dropout_keep_bits(uint64_t seed, uint64_t offset, float p, int64_t base,
                                                     int64_t row_stride, int64_t col_stride, int row0, int col0,
                                                     int n) {
  uint32_t bits = 0;
#pragma unroll 1
  for (int idx = 0; idx < n; ++idx) {
    const int64_t row = row0 + 8 * ((idx & 3) >> 1);
    const int64_t col = col0 + 8 * (idx >> 2) + (idx & 1);
    bits |= static_cast<uint32_t>(
                dropout_keep(seed, offset + static_cast<uint64_t>(base + row * row_stride + col * col_stride), p))
            << idx;
  }
  return bits;
}

}  // namespace cuda
}  // namespace fastattn
