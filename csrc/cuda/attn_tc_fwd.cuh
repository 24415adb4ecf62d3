// Flash-attention-2 forward on tensor cores (fp16 / bf16), one template per head-dim bucket.
//
// A block of 4 warps owns BM = 64 query rows of one (batch, head); warp w owns rows [16w, 16w+16).
// K/V tiles of BN keys stream through shared memory with cp.async double buffering; S = Q K^T and
// O += P V run on mma.sync m16n8k16 with fp32 accumulators; the softmax is online, in fp32
// registers, in log2 units (exp2). Key tiles past the causal diagonal are never visited, key tiles
// wholly covered by key_padding_mask are skipped, and per-element masking runs only on tiles that
// need it. Head dims below the bucket are zero-padded in shared memory (never copied in global).
#pragma once
#include "attn_common.cuh"

namespace fastattn {
namespace cuda {

template <typename T, int D, int BN>
struct FwdTC {
  static constexpr int kBM = 64;
  static constexpr int kThreads = 128;
  static constexpr int kLds = D + 8;  // +16 bytes per row: ldmatrix rows fall in distinct banks
  static constexpr size_t kSmem = static_cast<size_t>(kBM + 4 * BN) * kLds * sizeof(T);
  static_assert(D % 16 == 0 && BN % 16 == 0, "tile shapes must be multiples of the mma shape");
  static_assert(kSmem <= kMaxSmemSm80, "forward tile does not fit sm_80 shared memory");
  static_assert(BN <= 64, "keep bits: at most 32 accumulator elements per thread");
};

template <typename T, int D, int BN>
__global__ void __launch_bounds__(128, 1) attn_fwd_tc_kernel(const AttnParams p) {
  using Cfg = FwdTC<T, D, BN>;
  constexpr int BM = Cfg::kBM, LDS = Cfg::kLds, NT = Cfg::kThreads;
  constexpr int DN = D / 8;   // n8 tiles of the O accumulator
  constexpr int SN = BN / 8;  // n8 tiles of the score accumulator
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LDS]
  T* sK = sQ + BM * LDS;                   // [2][BN][LDS]
  T* sV = sK + 2 * BN * LDS;               // [2][BN][LDS]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  int bh;
  const int i0 = query_tile_of_block<BM>(p, bh);
  const QueryHead<T> qh(p, bh);
  const int E = p.E, Ev = p.Ev, S = p.S;

  const T* q = static_cast<const T*>(p.q) + static_cast<int64_t>(bh) * p.L * E;
  const bool vec_qk = E % 8 == 0 && aligned16(p.q) && aligned16(p.k);
  const bool vec_v = Ev % 8 == 0 && aligned16(p.v);
  const ScoreMask<T> sm(p, qh.b, qh.h);

  const int kv_end = p.causal ? min(S, i0 + BM) : S;  // keys past the last row's diagonal: skipped
  const int n_tiles = (kv_end + BN - 1) / BN;

  const KvTiles<T, BN, D, LDS, NT> kv{sK, sV, qh.k, qh.v, sm.kpm, n_tiles, S, E, Ev, vec_qk, vec_v};
  load_tile<T, BM, D, LDS, NT>(sQ, q, i0, p.L, E, vec_qk, tid);
  int t = kv.first(tid);

  float o[DN][4];
  zero_acc(o);
  float m[2] = {-INFINITY, -INFINITY};  // running row max, log2 units
  float l[2] = {0.f, 0.f};              // running row sum (this thread's columns only)
  const float scale = p.scale, scale_log2 = p.scale * kLog2e;
  const bool dropout = p.dropout_p > 0.f;
  const float keep_scale = keep_scale_of(p);
  const int row_base = i0 + warp * 16 + g;  // this thread's rows: row_base, row_base + 8

  int buf = 0;
  while (t < n_tiles) {
    const int t_next = kv.prefetch_next(t, buf, tid);
    const T* kt = kv.k_buf(buf);
    const T* vt = kv.v_buf(buf);

    // S = Q K^T for this warp's 16 rows x BN keys
    float s[SN][4];
    mma_smem_abt<T, D / 16, SN>(s, sQ, warp * 16, kt, LDS, E, lane);

    // mask, online softmax
    const int j0 = t * BN;
    const bool need_mask = sm.tile_needs_mask(i0, BM, j0, BN);
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nn = 0; nn < SN; ++nn) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nn][e];
        if (need_mask) {
          x = to_log2(sm.apply(x * scale, row_base + (e >> 1) * 8, j0 + nn * 8 + 2 * tq + (e & 1)));
        } else {
          x *= scale_log2;
        }
        s[nn][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float m_use[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      m_use[r] = mx[r] == -INFINITY ? 0.f : mx[r];  // a row that saw no key yet: no inf - inf
      const float alpha = exp2f(m[r] - m_use[r]);
      l[r] *= alpha;
#pragma unroll
      for (int dn = 0; dn < DN; ++dn) {
        o[dn][2 * r] *= alpha;
        o[dn][2 * r + 1] *= alpha;
      }
      m[r] = mx[r];
    }
#pragma unroll
    for (int nn = 0; nn < SN; ++nn) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = exp2f(s[nn][e] - m_use[e >> 1]);
        l[e >> 1] += pe;
        s[nn][e] = pe;
      }
    }
    if (dropout) {
      // element (row_base + 8*(e>>1), j0 + 8*nn + 2*tq + (e&1)); counter ((b*Hq+h)*L + row)*S + col
      const uint32_t keep = dropout_keep_bits(dropout_seed(p.seed), dropout_offset(p.seed), p.dropout_p,
                                              static_cast<int64_t>(bh) * p.L * S, S, 1, row_base, j0 + 2 * tq, SN * 4);
#pragma unroll
      for (int nn = 0; nn < SN; ++nn)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nn][e] = (keep >> (4 * nn + e)) & 1u ? s[nn][e] * keep_scale : 0.f;
    }

    // O += P V, P straight from the score accumulators
    mma_acc_a<T, BN / 16, DN>(o, s, vt, LDS, Ev, lane);
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
    buf ^= 1;
    t = t_next;
  }
  cp_async_wait<0>();

  // O / l and lse; a row that saw no key: O = 0, lse = +inf
  T* out = static_cast<T*>(p.out) + static_cast<int64_t>(bh) * p.L * Ev;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float lr = l[r];
    lr += __shfl_xor_sync(0xffffffffu, lr, 1);
    lr += __shfl_xor_sync(0xffffffffu, lr, 2);
    const int row = row_base + r * 8;
    if (row < p.L) {
      const float inv = lr != 0.f ? 1.f / lr : 0.f;  // a NaN sum stays NaN
      store_acc_row(out + static_cast<int64_t>(row) * Ev, o, r, inv, Ev, tq);
      if (tq == 0) p.lse[static_cast<int64_t>(bh) * p.L + row] = lr != 0.f ? m[r] * kLn2 + logf(lr) : INFINITY;
    }
  }
}

template <typename T, int D, int BN>
cudaError_t launch_attn_fwd_tc(const AttnParams& p, cudaStream_t stream) {
  using Cfg = FwdTC<T, D, BN>;
  auto kernel = attn_fwd_tc_kernel<T, D, BN>;
  if (Cfg::kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(Cfg::kSmem));
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = static_cast<int64_t>(p.N) * p.Hq * ((p.L + Cfg::kBM - 1) / Cfg::kBM);
  if (blocks == 0) return cudaSuccess;
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmem, stream>>>(p);
  return cudaGetLastError();
}


// The head-dim buckets of one dtype (attention_head_bucket picks one): <dtype, bucket, keys per tile>.
// Instantiated by attn_fwd_{fp16,bf16}.cu.
template <typename T>
cudaError_t attention_forward_tc(const AttnParams& p, cudaStream_t stream) {
  switch (attention_head_bucket(p.E, p.Ev)) {
    case 32: return launch_attn_fwd_tc<T, 32, 64>(p, stream);
    case 64: return launch_attn_fwd_tc<T, 64, 64>(p, stream);
    case 96: return launch_attn_fwd_tc<T, 96, 64>(p, stream);
    case 128: return launch_attn_fwd_tc<T, 128, 64>(p, stream);
    default: return launch_attn_fwd_tc<T, 256, 32>(p, stream);
  }
}

}  // namespace cuda
}  // namespace fastattn
