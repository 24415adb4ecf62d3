// fp32 attention: plain FMA, one warp per query row (forward, dQ) or per key row (dK, dV).
// Correct for every case the contract allows (masks through strides, key padding, causal, GQA,
// dropout, fully masked rows); not tuned: fp16/bf16 go to the tensor-core kernels.
//
// Lane c of a warp holds head-dim elements c, c + 32, ... (NC of them, NC * 32 >= head dim).
// Scores are made a chunk of 32 keys (or queries) at a time, one per lane, then broadcast with
// __shfl_sync for the rank-1 updates of the accumulators.
#include "attn_tc_bwd.cuh"  // attn_bwd_delta_kernel, launch_with_smem

namespace fastattn {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// dot of a shared-memory row (n floats) and a global row
__device__ __forceinline__ float dot_row(const float* __restrict__ srow, const float* __restrict__ grow, int n) {
  float acc = 0.f;
  for (int d = 0; d < n; ++d) acc = fmaf(srow[d], grow[d], acc);
  return acc;
}

// This lane's elements of a row of n floats: element c * 32 + lane in slot c.
// row_to_smem: the row into shared memory, zero past n.
template <int NC>
__device__ __forceinline__ void row_to_smem(float* __restrict__ srow, const float* __restrict__ grow, int n, int lane) {
#pragma unroll
  for (int c = 0; c < NC; ++c) srow[c * 32 + lane] = c * 32 + lane < n ? grow[c * 32 + lane] : 0.f;
}
// acc += a * row
template <int NC>
__device__ __forceinline__ void axpy_row(float (&acc)[NC], float a, const float* __restrict__ row, int n, int lane) {
#pragma unroll
  for (int c = 0; c < NC; ++c)
    if (c * 32 + lane < n) acc[c] = fmaf(a, row[c * 32 + lane], acc[c]);
}
// row = acc * scale
template <int NC>
__device__ __forceinline__ void store_row(float* __restrict__ row, const float (&acc)[NC], float scale, int n,
                                          int lane) {
#pragma unroll
  for (int c = 0; c < NC; ++c)
    if (c * 32 + lane < n) row[c * 32 + lane] = acc[c] * scale;
}

// The dropout decision of score element ((b * Hq + h) * L + i) * S + j: kept?
__device__ __forceinline__ bool kept(const AttnParams& p, int64_t ctr) {
  return dropout_keep(dropout_seed(p.seed), dropout_offset(p.seed) + static_cast<uint64_t>(ctr), p.dropout_p);
}

template <int NC>
__global__ void __launch_bounds__(128, 1) attn_fwd_fp32_kernel(const AttnParams p) {
  __shared__ float sq[kWarpsPerBlock][NC * 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;  // the query row
  if (gw >= static_cast<int64_t>(p.N) * p.Hq * p.L) return;
  const int i = static_cast<int>(gw % p.L);
  const QueryHead<float> qh(p, static_cast<int>(gw / p.L));
  const int E = p.E, Ev = p.Ev, S = p.S;
  const float *k = qh.k, *v = qh.v;
  const ScoreMask<float> sm(p, qh.b, qh.h);
  float* sqw = sq[warp];
  row_to_smem<NC>(sqw, static_cast<const float*>(p.q) + gw * E, E, lane);
  __syncwarp();

  float o[NC] = {};
  float m = -INFINITY, l = 0.f;  // log2 units; warp-uniform
  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = keep_scale_of(p);
  const int j_end = p.causal ? min(S, i + 1) : S;
  for (int j0 = 0; j0 < j_end; j0 += 32) {
    const int j = j0 + lane;
    float s = -INFINITY;
    if (j < j_end) s = to_log2(sm.apply(dot_row(sqw, k + static_cast<int64_t>(j) * E, E) * p.scale, i, j));
    const float m_new = fmaxf(m, warp_max(s));
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m - m_use);
    float pj = exp2f(s - m_use);
    l = l * alpha + warp_sum(pj);
    m = m_new;
#pragma unroll
    for (int c = 0; c < NC; ++c) o[c] *= alpha;
    if (dropout && pj != 0.f) pj = kept(p, gw * S + j) ? pj * keep_scale : 0.f;
    const int n = min(32, j_end - j0);
    for (int jj = 0; jj < n; ++jj) {
      const float pjj = __shfl_sync(0xffffffffu, pj, jj);
      if (pjj != 0.f) axpy_row<NC>(o, pjj, v + static_cast<int64_t>(j0 + jj) * Ev, Ev, lane);
    }
  }
  const float inv = l != 0.f ? 1.f / l : 0.f;  // a NaN sum stays NaN
  store_row<NC>(static_cast<float*>(p.out) + gw * Ev, o, inv, Ev, lane);
  if (lane == 0) p.lse[gw] = l != 0.f ? m * kLn2 + logf(l) : INFINITY;
}

template <int NC>
__global__ void __launch_bounds__(128, 1) attn_bwd_dq_fp32_kernel(const AttnParams p) {
  __shared__ float sq[kWarpsPerBlock][NC * 32];
  __shared__ float sdo[kWarpsPerBlock][NC * 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;  // the query row
  if (gw >= static_cast<int64_t>(p.N) * p.Hq * p.L) return;
  const int i = static_cast<int>(gw % p.L);
  const QueryHead<float> qh(p, static_cast<int>(gw / p.L));
  const int E = p.E, Ev = p.Ev, S = p.S;
  const float *k = qh.k, *v = qh.v;
  const ScoreMask<float> sm(p, qh.b, qh.h);
  float* sqw = sq[warp];
  float* sdow = sdo[warp];
  row_to_smem<NC>(sqw, static_cast<const float*>(p.q) + gw * E, E, lane);
  row_to_smem<NC>(sdow, static_cast<const float*>(p.dout) + gw * Ev, Ev, lane);
  __syncwarp();
  const float lse2 = p.lse_base[gw], rest = p.lse_rest[gw];  // see attn_params.h
  const float delta = p.delta[gw];
  float dq[NC] = {};
  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = keep_scale_of(p);
  const int j_end = p.causal ? min(S, i + 1) : S;
  for (int j0 = 0; j0 < j_end; j0 += 32) {
    const int j = j0 + lane;
    float ds = 0.f;
    if (j < j_end) {
      const float s = to_log2(sm.apply(dot_row(sqw, k + static_cast<int64_t>(j) * E, E) * p.scale, i, j));
      const float pe = exp2f((s - lse2) - rest);  // 0 where masked or where the row saw no key (lse = +inf)
      if (pe != 0.f) {
        float dp = dot_row(sdow, v + static_cast<int64_t>(j) * Ev, Ev);
        if (dropout) dp = kept(p, gw * S + j) ? dp * keep_scale : 0.f;
        ds = pe * (dp - delta);
      }
    }
    const int n = min(32, j_end - j0);
    for (int jj = 0; jj < n; ++jj) {
      const float dsj = __shfl_sync(0xffffffffu, ds, jj);
      if (dsj != 0.f) axpy_row<NC>(dq, dsj, k + static_cast<int64_t>(j0 + jj) * E, E, lane);
    }
  }
  store_row<NC>(static_cast<float*>(p.dq) + gw * E, dq, p.scale, E, lane);
}

// One warp per key row j of one (batch, kv head); walks every query of the GQA group's heads.
template <int NC>
__global__ void __launch_bounds__(128, 1) attn_bwd_dkdv_fp32_kernel(const AttnParams p) {
  __shared__ float sk[kWarpsPerBlock][NC * 32];
  __shared__ float sv[kWarpsPerBlock][NC * 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (gw >= static_cast<int64_t>(p.N) * p.Hkv * p.S) return;
  const int j = static_cast<int>(gw % p.S);
  const int bhkv = static_cast<int>(gw / p.S);
  const int b = bhkv / p.Hkv, hkv = bhkv % p.Hkv, group = p.Hq / p.Hkv;
  const int E = p.E, Ev = p.Ev, S = p.S, L = p.L;
  float* sk_w = sk[warp];
  float* sv_w = sv[warp];
  row_to_smem<NC>(sk_w, static_cast<const float*>(p.k) + gw * E, E, lane);
  row_to_smem<NC>(sv_w, static_cast<const float*>(p.v) + gw * Ev, Ev, lane);
  __syncwarp();
  float dk[NC] = {}, dv[NC] = {};
  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = keep_scale_of(p);
  const bool padded = p.kpm != nullptr && p.kpm[static_cast<int64_t>(b) * S + j] != 0;
  const int i_begin = p.causal ? j : 0;  // causal: only queries i >= j see key j
  for (int hh = 0; hh < (padded ? 0 : group); ++hh) {
    const int h = hkv * group + hh;
    const int64_t bh = static_cast<int64_t>(b) * p.Hq + h;
    const ScoreMask<float> sm(p, b, h);
    const float* q = static_cast<const float*>(p.q) + bh * L * E;
    const float* dout = static_cast<const float*>(p.dout) + bh * L * Ev;
    for (int i0 = i_begin; i0 < L; i0 += 32) {
      const int i = i0 + lane;
      float pd = 0.f, ds = 0.f;
      if (i < L) {
        const float s = to_log2(sm.apply(dot_row(sk_w, q + static_cast<int64_t>(i) * E, E) * p.scale, i, j));
        const float pe = exp2f((s - p.lse_base[bh * L + i]) - p.lse_rest[bh * L + i]);
        if (pe != 0.f) {
          const float z = !dropout ? 1.f : kept(p, (bh * L + i) * S + j) ? keep_scale : 0.f;
          const float dp = dot_row(sv_w, dout + static_cast<int64_t>(i) * Ev, Ev);
          pd = pe * z;
          ds = pe * (dp * z - p.delta[bh * L + i]);
        }
      }
      const int n = min(32, L - i0);
      for (int ii = 0; ii < n; ++ii) {
        const float pdi = __shfl_sync(0xffffffffu, pd, ii);
        const float dsi = __shfl_sync(0xffffffffu, ds, ii);
        if (pdi != 0.f) axpy_row<NC>(dv, pdi, dout + static_cast<int64_t>(i0 + ii) * Ev, Ev, lane);
        if (dsi != 0.f) axpy_row<NC>(dk, dsi, q + static_cast<int64_t>(i0 + ii) * E, E, lane);
      }
    }
  }
  store_row<NC>(static_cast<float*>(p.dk) + gw * E, dk, p.scale, E, lane);
  store_row<NC>(static_cast<float*>(p.dv) + gw * Ev, dv, 1.f, Ev, lane);
}

int64_t warp_blocks(int64_t rows) { return (rows + kWarpsPerBlock - 1) / kWarpsPerBlock; }

template <int NC>
cudaError_t fwd_fp32(const AttnParams& p, cudaStream_t stream) {
  return launch_with_smem(attn_fwd_fp32_kernel<NC>, warp_blocks(static_cast<int64_t>(p.N) * p.Hq * p.L),
                          32 * kWarpsPerBlock, 0, p, stream);
}

template <int NC>
cudaError_t bwd_fp32(const AttnParams& p, cudaStream_t stream) {
  cudaError_t err = launch_attn_bwd_delta<float>(p, stream);
  if (err != cudaSuccess) return err;
  err = launch_with_smem(attn_bwd_dkdv_fp32_kernel<NC>, warp_blocks(static_cast<int64_t>(p.N) * p.Hkv * p.S),
                         32 * kWarpsPerBlock, 0, p, stream);
  if (err != cudaSuccess) return err;
  return launch_with_smem(attn_bwd_dq_fp32_kernel<NC>, warp_blocks(static_cast<int64_t>(p.N) * p.Hq * p.L),
                          32 * kWarpsPerBlock, 0, p, stream);
}

}  // namespace

cudaError_t attention_forward_fp32(const AttnParams& p, cudaStream_t stream) {
  switch (attention_head_bucket(p.E, p.Ev)) {
    case 32: return fwd_fp32<1>(p, stream);
    case 64: return fwd_fp32<2>(p, stream);
    case 96: return fwd_fp32<3>(p, stream);
    case 128: return fwd_fp32<4>(p, stream);
    default: return fwd_fp32<8>(p, stream);
  }
}

cudaError_t attention_backward_fp32(const AttnParams& p, cudaStream_t stream) {
  switch (attention_head_bucket(p.E, p.Ev)) {
    case 32: return bwd_fp32<1>(p, stream);
    case 64: return bwd_fp32<2>(p, stream);
    case 96: return bwd_fp32<3>(p, stream);
    case 128: return bwd_fp32<4>(p, stream);
    default: return bwd_fp32<8>(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastattn
