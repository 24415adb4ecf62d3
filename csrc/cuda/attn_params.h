// Plain-pointer interface between the torch glue (cuda_ops.cpp) and the CUDA kernels (*.cu).
// Nothing here includes torch, so the kernels compile with nvcc alone (tests/test_cuda_compile.py).
//
// Layouts (all contiguous unless said otherwise; see fastattn/backends/README.md):
//   q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev), out (N, Hq, L, Ev), lse (N, Hq, L) float32
//   attn_mask: additive, float32, read at mask[b*mask_sb + h*mask_sh + i*mask_sl + j*mask_ss]
//              (an expanded (N, Hq, L, S) view: strides may be 0)
//   kpm: key padding, bool (N, S) as bytes, nonzero = key ignored
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "../activation.h"

namespace fastattn {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Dropout key: Philox seed and counter offset (element c of a call draws philox_uniform(seed,
// offset + c)). When `device` is set, the kernels read (seed, offset) from that int64 pair in device
// memory, where torch.ops.fastattn.cuda_philox_seed wrote the CUDA generator's state (at launch, or
// at each replay of a CUDA graph); else they use the two values.
struct DropoutKey {
  uint64_t seed = 0;
  uint64_t offset = 0;
  const int64_t* device = nullptr;
};

#if defined(__CUDACC__)
__device__ __forceinline__ uint64_t dropout_seed(const DropoutKey& k) {
  return k.device != nullptr ? static_cast<uint64_t>(k.device[0]) : k.seed;
}
__device__ __forceinline__ uint64_t dropout_offset(const DropoutKey& k) {
  return k.device != nullptr ? static_cast<uint64_t>(k.device[1]) : k.offset;
}
#endif

// Writes the CUDA generator state `state` (an at::PhiloxCudaState, passed opaquely so that this header
// needs no torch) as int64 (seed, offset) to out[0], out[1]: one thread on `stream` (philox_seed.cu).
cudaError_t write_philox_seed(const void* state, int64_t* out, cudaStream_t stream);

struct AttnParams {
  const void* q = nullptr;     // (N, Hq, L, E)
  const void* k = nullptr;     // (N, Hkv, S, E)
  const void* v = nullptr;     // (N, Hkv, S, Ev)
  void* out = nullptr;         // (N, Hq, L, Ev)      forward output / backward input
  float* lse = nullptr;        // (N, Hq, L)          forward output / backward input
  const float* mask = nullptr;  // additive mask, float32, or null
  int64_t mask_sb = 0, mask_sh = 0, mask_sl = 0, mask_ss = 0;  // its strides in elements
  const uint8_t* kpm = nullptr;  // (N, S) nonzero = key ignored, or null
  int N = 0, Hq = 0, Hkv = 0, L = 0, S = 0, E = 0, Ev = 0;
  float scale = 1.f;
  bool causal = false;
  float dropout_p = 0.f;  // keep iff philox_uniform(seed, offset + ((b*Hq+h)*L+i)*S+j) >= dropout_p
  DropoutKey seed;
  // backward only
  const void* dout = nullptr;  // (N, Hq, L, Ev)
  void* dq = nullptr;          // (N, Hq, L, E)
  void* dk = nullptr;          // (N, Hkv, S, E)
  void* dv = nullptr;          // (N, Hkv, S, Ev)
  float* delta = nullptr;      // (N, Hq, L) float32 workspace: rowsum(dout * out)
  // (N, Hq, L) float32 workspaces, the lse as the backward kernels use it (log2 units): P =
  // exp2(s - lse_base - lse_rest); lse_base = lse * log2(e) and lse_rest = 0, except on rows whose
  // float32 lse lost precision to its magnitude (|lse| >= 32: m + log l rounded to the ulp of m),
  // which the delta pre-pass recomputes as the row max and the log2 of the sum, kept apart.
  float* lse_base = nullptr;
  float* lse_rest = nullptr;
};

// Head-dim bucket the kernels are compiled for: the smallest of 32, 64, 96, 128, 256 that holds
// max(E, Ev); inputs are zero-padded up to it inside the kernel (never copied).
inline int attention_head_bucket(int e, int ev) {
  const int d = e > ev ? e : ev;
  return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 256;
}

// Each returns cudaSuccess or the launch error; they launch on `stream` only and never synchronise.
// T = __half or __nv_bfloat16: tensor cores (mma.sync m16n8k16), flash-attention-2 tiling. Defined in
// attn_tc_fwd.cuh / attn_tc_bwd.cuh; attn_{fwd,bwd}_{fp16,bf16}.cu instantiate one each (one file per
// pass and dtype, so that ninja compiles them in parallel).
template <typename T>
cudaError_t attention_forward_tc(const AttnParams& p, cudaStream_t stream);
template <typename T>
cudaError_t attention_backward_tc(const AttnParams& p, cudaStream_t stream);
extern template cudaError_t attention_forward_tc<__half>(const AttnParams&, cudaStream_t);
extern template cudaError_t attention_forward_tc<__nv_bfloat16>(const AttnParams&, cudaStream_t);
extern template cudaError_t attention_backward_tc<__half>(const AttnParams&, cudaStream_t);
extern template cudaError_t attention_backward_tc<__nv_bfloat16>(const AttnParams&, cudaStream_t);
// fp32: plain FMA, one warp per query row (forward, dq) or key row (dk, dv).
cudaError_t attention_forward_fp32(const AttnParams& p, cudaStream_t stream);
cudaError_t attention_backward_fp32(const AttnParams& p, cudaStream_t stream);

// ---- feed-forward elementwise kernels (the GEMMs are cuBLASLt, in cuda_ops.cpp) -------------------
// Activation: csrc/activation.h (fastattn::Activation)

// hidden[t, f] = dropout(act(pre[t, f] (+ bias[f] if bias))), and when pre_out is not null it gets
// the biased pre-activation. pre and hidden may alias. Dropout counter t*F + f.
cudaError_t ffn_activation_forward(DType dtype, Activation act, const void* pre, const void* bias,
                                   void* pre_out, void* hidden, int64_t T, int64_t F, float dropout_p,
                                   DropoutKey seed, cudaStream_t stream);
// From saved pre-activation and d_hidden_dropped = grad wrt the dropped hidden:
//   hidden_out[t, f] = dropout(act(pre))            (what the second GEMM saw; for dW2)
//   dpre[t, f]       = d_hidden_dropped * keep/(1-p) * act'(pre)
// hidden_out may be null. dpre may alias d_hidden_dropped.
cudaError_t ffn_activation_backward(DType dtype, Activation act, const void* pre,
                                    const void* d_hidden_dropped, void* hidden_out, void* dpre, int64_t T,
                                    int64_t F, float dropout_p, DropoutKey seed, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
