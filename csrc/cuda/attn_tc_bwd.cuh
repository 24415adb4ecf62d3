// Flash-attention-2 backward on tensor cores (fp16 / bf16), deterministic (no atomics):
//   1. attn_bwd_delta_kernel: delta = rowsum(dO * O) in fp32 (one warp per row), and the lse the
//      other kernels use, p.lse_base + p.lse_rest (see attn_params.h).
//   2. attn_bwd_dkdv_tc_kernel: a block owns BN = 64 keys of one (batch, kv head) and walks every
//      query tile of every query head of its GQA group, recomputing P = exp(S - lse) from the saved
//      lse; dK and dV accumulate in fp32 registers and are written once. For the 256 bucket the
//      two accumulators do not fit one thread's registers, so dV and dK run as two launches.
//   3. attn_bwd_dq_tc_kernel: a block owns BM = 64 query rows and walks the key tiles (causal and
//      key-padding skipping as in the forward); dQ accumulates in registers and is written once.
// Dropout regenerates the forward's mask from the element's coordinates (csrc/philox.h).
#pragma once
#include "attn_common.cuh"

namespace fastattn {
namespace cuda {

__device__ __forceinline__ float warp_allsum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// One warp per row. The rare rows with |lse| >= 32 (large logits or a huge mask offset) walk their
// keys once more: the row max m and the sum l in log2 units (P = exp2(s - m) / l, kept apart, as
// the forward had them), and, without dropout, delta = rowsum(P dP) with P unrounded and dP in
// fp32, as torch's math takes it: rowsum(dO O) from an output rounded to 16 bits, or summed in
// another order than dP, is off by about ulp(|dO| |O|), and dS = P (dP - delta) carries that into
// dQ and dK times the (large) logit scale.
template <typename T>
__global__ void __launch_bounds__(256) attn_bwd_delta_kernel(const AttnParams p) {
  const int64_t rows = static_cast<int64_t>(p.N) * p.Hq * p.L;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int Ev = p.Ev;
  const T* dout = static_cast<const T*>(p.dout) + row * Ev;
  const T* out = static_cast<const T*>(p.out) + row * Ev;
  float acc = 0.f;
  for (int c = lane; c < Ev; c += 32) acc += TypeOps<T>::to_float(dout[c]) * TypeOps<T>::to_float(out[c]);
  acc = warp_allsum(acc);
  const float lse = p.lse[row];
  float base = lse * kLog2e, rest = 0.f;
  if (fabsf(lse) >= 32.f && lse != INFINITY) {  // warp-uniform
    const int i = static_cast<int>(row % p.L), bh = static_cast<int>(row / p.L);
    const int b = bh / p.Hq, h = bh % p.Hq, hkv = h / (p.Hq / p.Hkv);
    const int E = p.E, S = p.S;
    const T* q = static_cast<const T*>(p.q) + row * E;
    const T* k = static_cast<const T*>(p.k) + static_cast<int64_t>(b * p.Hkv + hkv) * S * E;
    const T* v = static_cast<const T*>(p.v) + static_cast<int64_t>(b * p.Hkv + hkv) * S * Ev;
    const ScoreMask<T> sm(p, b, h);
    float m = -INFINITY, l = 0.f, dd = 0.f;
    const int j_end = p.causal ? min(S, i + 1) : S;
    for (int j0 = 0; j0 < j_end; j0 += 32) {
      const int j = j0 + lane;
      float s = -INFINITY, dp = 0.f;
      if (j < j_end) {
        float qk = 0.f;
        for (int d = 0; d < E; ++d)
          qk = fmaf(TypeOps<T>::to_float(q[d]), TypeOps<T>::to_float(k[static_cast<int64_t>(j) * E + d]), qk);
        s = to_log2(sm.apply(qk * p.scale, i, j));
        for (int d = 0; d < Ev; ++d)
          dp = fmaf(TypeOps<T>::to_float(dout[d]), TypeOps<T>::to_float(v[static_cast<int64_t>(j) * Ev + d]), dp);
      }
      float mx = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m, mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m - m_use);
      const float pj = exp2f(s - m_use);
      l = l * alpha + warp_allsum(pj);
      dd = dd * alpha + warp_allsum(pj != 0.f ? pj * dp : 0.f);
      m = m_new;
    }
    if (l != 0.f) {
      base = m;
      rest = log2f(l);
      if (p.dropout_p == 0.f) acc = dd / l;  // with dropout, delta is rowsum(P Z dP) / (1 - p): keep dO.O
    }
  }
  if (lane == 0) {
    p.delta[row] = acc;
    p.lse_base[row] = base;
    p.lse_rest[row] = rest;
  }
}

template <typename T>
cudaError_t launch_attn_bwd_delta(const AttnParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.N) * p.Hq * p.L;
  if (rows == 0) return cudaSuccess;
  attn_bwd_delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

// ---- dQ ------------------------------------------------------------------------------------------
template <typename T, int D, int BN>
struct DqTC {
  static constexpr int kBM = 64;
  static constexpr int kThreads = 128;
  static constexpr int kLds = D + 8;
  static constexpr size_t kSmem = static_cast<size_t>(2 * kBM + 4 * BN) * kLds * sizeof(T);
  static_assert(kSmem <= kMaxSmemSm80, "dQ tile does not fit sm_80 shared memory");
  static_assert(BN % 16 == 0 && BN <= 64, "keep bits: at most 32 accumulator elements per thread");
};

template <typename T, int D, int BN>
__global__ void __launch_bounds__(128, 1) attn_bwd_dq_tc_kernel(const AttnParams p) {
  using Cfg = DqTC<T, D, BN>;
  constexpr int BM = Cfg::kBM, LDS = Cfg::kLds, NT = Cfg::kThreads;
  constexpr int DN = D / 8, SN = BN / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LDS]
  T* sdO = sQ + BM * LDS;                  // [BM][LDS]
  T* sK = sdO + BM * LDS;                  // [2][BN][LDS]
  T* sV = sK + 2 * BN * LDS;               // [2][BN][LDS]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  int bh;
  const int i0 = query_tile_of_block<BM>(p, bh);
  const QueryHead<T> qh(p, bh);
  const int E = p.E, Ev = p.Ev, S = p.S;

  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(bh) * p.L * E;
  const T* dout = static_cast<const T*>(p.dout) + static_cast<int64_t>(bh) * p.L * Ev;
  const bool vec_qk = E % 8 == 0 && aligned16(p.q) && aligned16(p.k);
  const bool vec_v = Ev % 8 == 0 && aligned16(p.v) && aligned16(p.dout);
  const ScoreMask<T> sm(p, qh.b, qh.h);

  const int kv_end = p.causal ? min(S, i0 + BM) : S;
  const int n_tiles = (kv_end + BN - 1) / BN;

  const KvTiles<T, BN, D, LDS, NT> kv{sK, sV, qh.k, qh.v, sm.kpm, n_tiles, S, E, Ev, vec_qk, vec_v};
  load_tile<T, BM, D, LDS, NT>(sQ, q, i0, p.L, E, vec_qk, tid);
  load_tile<T, BM, D, LDS, NT>(sdO, dout, i0, p.L, Ev, vec_v, tid);
  int t = kv.first(tid);

  const int row_base = i0 + warp * 16 + g;
  float lse2[2], rest[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_base + r * 8;
    lse2[r] = row < p.L ? p.lse_base[static_cast<int64_t>(bh) * p.L + row] : INFINITY;
    rest[r] = row < p.L ? p.lse_rest[static_cast<int64_t>(bh) * p.L + row] : 0.f;
    dl[r] = row < p.L ? p.delta[static_cast<int64_t>(bh) * p.L + row] : 0.f;
  }
  float dq[DN][4];
  zero_acc(dq);
  const float scale = p.scale, scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = keep_scale_of(p);

  int buf = 0;
  while (t < n_tiles) {
    const int t_next = kv.prefetch_next(t, buf, tid);
    const T* kt = kv.k_buf(buf);
    const T* vt = kv.v_buf(buf);

    float s[SN][4], dp[SN][4];
    mma_smem_abt<T, D / 16, SN>(s, sQ, warp * 16, kt, LDS, E, lane);    // S = Q K^T
    mma_smem_abt<T, D / 16, SN>(dp, sdO, warp * 16, vt, LDS, Ev, lane);  // dP = dO V^T
    // dS = P * (dP_kept - delta), P = exp(S - lse)  (into s)
    const int j0 = t * BN;
    const bool need_mask = sm.tile_needs_mask(i0, BM, j0, BN);
    const uint32_t keep = dropout ? dropout_keep_bits(dropout_seed(p.seed), dropout_offset(p.seed), p.dropout_p,
                                                      static_cast<int64_t>(bh) * p.L * S, S, 1, row_base, j0 + 2 * tq,
                                                      SN * 4)
                                  : 0xffffffffu;
#pragma unroll
    for (int nn = 0; nn < SN; ++nn) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int row = row_base + r * 8, col = j0 + nn * 8 + 2 * tq + (e & 1);
        const float x = need_mask ? to_log2(sm.apply(s[nn][e] * scale, row, col)) : s[nn][e] * scale_log2;
        const float pe = exp2f((x - lse2[r]) - rest[r]);
        const float dpe = (keep >> (4 * nn + e)) & 1u ? dp[nn][e] * keep_scale : 0.f;
        s[nn][e] = pe * (dpe - dl[r]);
      }
    }
    // dQ += dS K
    mma_acc_a<T, BN / 16, DN>(dq, s, kt, LDS, E, lane);
    __syncthreads();
    buf ^= 1;
    t = t_next;
  }
  cp_async_wait<0>();

  T* dqo = static_cast<T*>(p.dq) + static_cast<int64_t>(bh) * p.L * E;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_base + r * 8;
    if (row < p.L) store_acc_row(dqo + static_cast<int64_t>(row) * E, dq, r, scale, E, tq);
  }
}

// ---- dK, dV --------------------------------------------------------------------------------------
template <typename T, int D, int BM>
struct DkdvTC {
  static constexpr int kBN = 64;  // keys per block: 16 per warp
  static constexpr int kThreads = 128;
  static constexpr int kLds = D + 8;
  static constexpr size_t kSmem =
      static_cast<size_t>(2 * kBN + 4 * BM) * kLds * sizeof(T) + 6 * BM * sizeof(float);
  static_assert(kSmem <= kMaxSmemSm80, "dK/dV tile does not fit sm_80 shared memory");
  static_assert(BM % 16 == 0 && BM <= 64, "keep bits: at most 32 accumulator elements per thread");
};

// Transposed problem: this warp's 16 keys are the rows, the BM queries of a tile the columns.
//   S^T = K Q^T, P^T = exp(S^T - lse), dV += P_kept^T dO, dP^T = V dO^T,
//   dS^T = P^T * (dP_kept^T - delta), dK += dS^T Q  (times scale at the end)
template <typename T, int D, int BM, bool DO_DK, bool DO_DV>
__global__ void __launch_bounds__(128, 1) attn_bwd_dkdv_tc_kernel(const AttnParams p) {
  using Cfg = DkdvTC<T, D, BM>;
  constexpr int BN = Cfg::kBN, LDS = Cfg::kLds, NT = Cfg::kThreads;
  constexpr int DN = D / 8, QN = BM / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN][LDS]
  T* sV = sK + BN * LDS;                   // [BN][LDS]
  T* sQ = sV + BN * LDS;                   // [2][BM][LDS]
  T* sdO = sQ + 2 * BM * LDS;              // [2][BM][LDS]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * LDS);  // [2][BM], log2 units
  float* sDelta = sLse + 2 * BM;                               // [2][BM]
  float* sRest = sDelta + 2 * BM;                              // [2][BM], log2 units

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int E = p.E, Ev = p.Ev, S = p.S, L = p.L;
  const int n_nblocks = (S + BN - 1) / BN;
  const int bhkv = blockIdx.x / n_nblocks;
  const int nb = blockIdx.x % n_nblocks;
  const int b = bhkv / p.Hkv, hkv = bhkv % p.Hkv;
  const int group = p.Hq / p.Hkv;
  const int j0 = nb * BN;

  const T* k = static_cast<const T*>(p.k) + static_cast<int64_t>(bhkv) * S * E;
  const T* v = static_cast<const T*>(p.v) + static_cast<int64_t>(bhkv) * S * Ev;
  const bool vec_qk = E % 8 == 0 && aligned16(p.q) && aligned16(p.k);
  const bool vec_v = Ev % 8 == 0 && aligned16(p.v) && aligned16(p.dout);
  const uint8_t* kpm_b = p.kpm ? p.kpm + static_cast<int64_t>(b) * S : nullptr;

  // Query tiles that can see these keys: causal -> from the tile holding query j0 on.
  const int n_qtiles = (L + BM - 1) / BM;
  const int qt_begin = p.causal ? min(j0 / BM, n_qtiles) : 0;
  const int per_head = n_qtiles - qt_begin;
  // A wholly padded key tile gets zero gradients: visit nothing.
  const int n_iters = key_tile_live(kpm_b, j0, BN, S) ? group * per_head : 0;

  auto load_q_tile = [&](int it, int bufi) {
    const int h = hkv * group + it / per_head;
    const int qi0 = (qt_begin + it % per_head) * BM;
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + h;
    load_tile<T, BM, D, LDS, NT>(sQ + bufi * BM * LDS, static_cast<const T*>(p.q) + bh * L * E, qi0, L, E, vec_qk,
                                 tid);
    load_tile<T, BM, D, LDS, NT>(sdO + bufi * BM * LDS, static_cast<const T*>(p.dout) + bh * L * Ev, qi0, L, Ev,
                                 vec_v, tid);
    for (int r = tid; r < BM; r += NT) {
      const int row = qi0 + r;
      sLse[bufi * BM + r] = row < L ? p.lse_base[bh * L + row] : INFINITY;
      sRest[bufi * BM + r] = row < L ? p.lse_rest[bh * L + row] : 0.f;
      sDelta[bufi * BM + r] = row < L ? p.delta[bh * L + row] : 0.f;
    }
  };

  load_kv_tile<T, BN, D, LDS, NT>(sK, sV, k, v, j0, S, E, Ev, vec_qk, vec_v, tid);
  if (n_iters > 0) load_q_tile(0, 0);
  cp_async_commit();

  float dk[DO_DK ? DN : 1][4], dv[DO_DV ? DN : 1][4];
  zero_acc(dk);
  zero_acc(dv);
  const float scale = p.scale, scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = keep_scale_of(p);
  const int key_base = j0 + warp * 16 + g;  // this thread's keys: key_base, key_base + 8

  for (int it = 0; it < n_iters; ++it) {
    const int bufi = it & 1;
    if (it + 1 < n_iters) load_q_tile(it + 1, bufi ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const int h = hkv * group + it / per_head;
    const int qi0 = (qt_begin + it % per_head) * BM;
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + h;
    const T* qt = sQ + bufi * BM * LDS;
    const T* dot = sdO + bufi * BM * LDS;
    const float* lse_t = sLse + bufi * BM;
    const float* rest_t = sRest + bufi * BM;
    const float* delta_t = sDelta + bufi * BM;
    const ScoreMask<T> sm(p, b, h);
    const bool need_mask = sm.tile_needs_mask(qi0, BM, j0, BN);

    float s[QN][4], dp[QN][4];
    mma_smem_abt<T, D / 16, QN>(s, sK, warp * 16, qt, LDS, E, lane);  // S^T = K Q^T
    if constexpr (DO_DK) mma_smem_abt<T, D / 16, QN>(dp, sV, warp * 16, dot, LDS, Ev, lane);  // dP^T = V dO^T
    // s <- P_kept^T (for dV), dp <- dS^T (for dK). Counter of (query, key): (bh*L + query)*S + key,
    // i.e. base + key*1 + query*S: the fragment's rows (keys) have stride 1, its columns stride S.
    const uint32_t keep = dropout ? dropout_keep_bits(dropout_seed(p.seed), dropout_offset(p.seed), p.dropout_p,
                                                      bh * L * S, 1, S, key_base, qi0 + 2 * tq, QN * 4)
                                  : 0xffffffffu;
#pragma unroll
    for (int nn = 0; nn < QN; ++nn) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_base + (e >> 1) * 8;
        const int qc = nn * 8 + 2 * tq + (e & 1);  // query column within the tile
        const int row = qi0 + qc;
        const float x = need_mask ? to_log2(sm.apply(s[nn][e] * scale, row, key)) : s[nn][e] * scale_log2;
        const float pe = exp2f((x - lse_t[qc]) - rest_t[qc]);
        const float z = (keep >> (4 * nn + e)) & 1u ? keep_scale : 0.f;  // keep/(1-p) or 0
        if (DO_DK) dp[nn][e] = pe * (dp[nn][e] * z - delta_t[qc]);
        s[nn][e] = pe * z;
      }
    }
    if constexpr (DO_DV) mma_acc_a<T, BM / 16, DN>(dv, s, dot, LDS, Ev, lane);  // dV += P_kept^T dO
    if constexpr (DO_DK) mma_acc_a<T, BM / 16, DN>(dk, dp, qt, LDS, E, lane);   // dK += dS^T Q
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key_base + r * 8;
    if (key >= S) continue;
    if constexpr (DO_DK) {
      store_acc_row(static_cast<T*>(p.dk) + (static_cast<int64_t>(bhkv) * S + key) * E, dk, r, scale, E, tq);
    }
    if constexpr (DO_DV) {
      store_acc_row(static_cast<T*>(p.dv) + (static_cast<int64_t>(bhkv) * S + key) * Ev, dv, r, 1.f, Ev, tq);
    }
  }
}

template <typename Kernel>
cudaError_t launch_with_smem(Kernel kernel, int64_t blocks, int threads, size_t smem, const AttnParams& p,
                             cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// delta, then dK/dV (one launch, or two when SPLIT), then dQ. p.delta must hold N*Hq*L floats.
template <typename T, int D, int BN_Q, int BM_KV, bool SPLIT>
cudaError_t launch_attn_bwd_tc(const AttnParams& p, cudaStream_t stream) {
  cudaError_t err = launch_attn_bwd_delta<T>(p, stream);
  if (err != cudaSuccess) return err;
  using KV = DkdvTC<T, D, BM_KV>;
  const int64_t kv_blocks = static_cast<int64_t>(p.N) * p.Hkv * ((p.S + KV::kBN - 1) / KV::kBN);
  if constexpr (SPLIT) {
    err = launch_with_smem(attn_bwd_dkdv_tc_kernel<T, D, BM_KV, false, true>, kv_blocks, KV::kThreads, KV::kSmem,
                           p, stream);
    if (err != cudaSuccess) return err;
    err = launch_with_smem(attn_bwd_dkdv_tc_kernel<T, D, BM_KV, true, false>, kv_blocks, KV::kThreads, KV::kSmem,
                           p, stream);
  } else {
    err = launch_with_smem(attn_bwd_dkdv_tc_kernel<T, D, BM_KV, true, true>, kv_blocks, KV::kThreads, KV::kSmem, p,
                           stream);
  }
  if (err != cudaSuccess) return err;
  using Q = DqTC<T, D, BN_Q>;
  const int64_t q_blocks = static_cast<int64_t>(p.N) * p.Hq * ((p.L + Q::kBM - 1) / Q::kBM);
  return launch_with_smem(attn_bwd_dq_tc_kernel<T, D, BN_Q>, q_blocks, Q::kThreads, Q::kSmem, p, stream);
}


// The head-dim buckets of one dtype (attention_head_bucket picks one): <dtype, bucket, keys per dQ
// tile, queries per dK/dV tile, split dK/dV>. Instantiated by attn_bwd_{fp16,bf16}.cu.
template <typename T>
cudaError_t attention_backward_tc(const AttnParams& p, cudaStream_t stream) {
  switch (attention_head_bucket(p.E, p.Ev)) {
    case 32: return launch_attn_bwd_tc<T, 32, 64, 64, false>(p, stream);
    case 64: return launch_attn_bwd_tc<T, 64, 64, 64, false>(p, stream);
    case 96: return launch_attn_bwd_tc<T, 96, 64, 32, false>(p, stream);
    case 128: return launch_attn_bwd_tc<T, 128, 64, 32, false>(p, stream);
    default: return launch_attn_bwd_tc<T, 256, 32, 32, true>(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastattn
