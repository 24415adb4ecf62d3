// Feed-forward elementwise kernels around the cuBLASLt GEMMs of cuda_ops.cpp: bias + activation +
// dropout of the hidden (forward), and dropout + activation derivative (backward). One thread per
// element, grid-stride; the dropout counter of hidden element (t, f) is t*F + f (csrc/philox.h).
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../philox.h"
#include "attn_common.cuh"  // TypeOps
#include "attn_params.h"

namespace fastattn {
namespace cuda {
namespace {

constexpr float kSqrt1_2 = 0.70710678118654752f;       // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;    // 1/sqrt(2*pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;   // sqrt(2/pi)
constexpr float kGeluTanhCubic = 0.044715f;

// tanh through exp: under --use_fast_math (setup.py) tanhf becomes MUFU.TANH, good to ~2^-11 only,
// too coarse for fp32 gelu_tanh; this form's absolute error stays ~1e-7.
__device__ __forceinline__ float tanh_accurate(float u) {
  const float e = expf(2.f * fabsf(u));
  return copysignf(1.f - 2.f / (e + 1.f), u);
}

__device__ __forceinline__ float act_fwd(Activation act, float x) {
  switch (act) {
    case Activation::kRelu: return x <= 0.f ? 0.f : x;  // NaN stays NaN, as torch.relu
    case Activation::kGelu: return 0.5f * x * (1.f + erff(x * kSqrt1_2));
    default: return 0.5f * x * (1.f + tanh_accurate(kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x)));
  }
}

__device__ __forceinline__ float act_grad(Activation act, float x) {
  switch (act) {
    case Activation::kRelu: return x <= 0.f ? 0.f : 1.f;  // NaN passes the gradient (torch)
    case Activation::kGelu: return 0.5f * (1.f + erff(x * kSqrt1_2)) + x * kInvSqrt2Pi * expf(-0.5f * x * x);
    default: {
      const float u = kSqrt2OverPi * (x + kGeluTanhCubic * x * x * x);
      const float t = tanh_accurate(u);
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * kSqrt2OverPi * (1.f + 3.f * kGeluTanhCubic * x * x);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) ffn_act_fwd_kernel(Activation act, const T* pre,  // (T, F), may alias hidden
                                                          const T* __restrict__ bias,                // (F,) or null
                                                          T* pre_out,                                // (T, F) or null
                                                          T* hidden,                                 // (T, F)
                                                          int64_t total, int64_t F, float p, DropoutKey seed) {
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float x = TypeOps<T>::to_float(pre[idx]);
    if (bias) {
      // round the biased pre-activation to T, as torch's addmm would, and act on what is saved
      const T xb = TypeOps<T>::from_float(x + TypeOps<T>::to_float(bias[idx % F]));
      if (pre_out) pre_out[idx] = xb;
      x = TypeOps<T>::to_float(xb);
    } else if (pre_out) {
      pre_out[idx] = pre[idx];
    }
    float y = act_fwd(act, x);
    if (p > 0.f) y = philox_uniform(dropout_seed(seed), dropout_offset(seed) + static_cast<uint64_t>(idx)) >= p ? y * keep_scale : 0.f;
    hidden[idx] = TypeOps<T>::from_float(y);
  }
}

template <typename T>
__global__ void __launch_bounds__(256) ffn_act_bwd_kernel(Activation act, const T* __restrict__ pre,  // (T, F)
                                                          const T* dh,      // (T, F) grad wrt dropped hidden
                                                          T* hidden_out,    // (T, F) or null
                                                          T* dpre,          // (T, F), may alias dh
                                                          int64_t total, float p, DropoutKey seed) {
  const float keep_scale = p > 0.f ? 1.f / (1.f - p) : 1.f;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = TypeOps<T>::to_float(pre[idx]);
    float z = 1.f;
    if (p > 0.f) z = philox_uniform(dropout_seed(seed), dropout_offset(seed) + static_cast<uint64_t>(idx)) >= p ? keep_scale : 0.f;
    if (hidden_out) hidden_out[idx] = TypeOps<T>::from_float(act_fwd(act, x) * z);
    dpre[idx] = TypeOps<T>::from_float(TypeOps<T>::to_float(dh[idx]) * z * act_grad(act, x));
  }
}

unsigned grid_for(int64_t total) {
  const int64_t blocks = (total + 255) / 256;
  return static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
}

template <typename T>
cudaError_t act_fwd_t(Activation act, const void* pre, const void* bias, void* pre_out, void* hidden, int64_t total,
                      int64_t F, float p, DropoutKey seed, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  ffn_act_fwd_kernel<T><<<grid_for(total), 256, 0, stream>>>(act, static_cast<const T*>(pre),
                                                             static_cast<const T*>(bias), static_cast<T*>(pre_out),
                                                             static_cast<T*>(hidden), total, F, p, seed);
  return cudaGetLastError();
}

template <typename T>
cudaError_t act_bwd_t(Activation act, const void* pre, const void* dh, void* hidden_out, void* dpre, int64_t total,
                      float p, DropoutKey seed, cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  ffn_act_bwd_kernel<T><<<grid_for(total), 256, 0, stream>>>(act, static_cast<const T*>(pre),
                                                             static_cast<const T*>(dh), static_cast<T*>(hidden_out),
                                                             static_cast<T*>(dpre), total, p, seed);
  return cudaGetLastError();
}

}  // namespace

cudaError_t ffn_activation_forward(DType dtype, Activation act, const void* pre, const void* bias, void* pre_out,
                                   void* hidden, int64_t T, int64_t F, float dropout_p, DropoutKey seed,
                                   cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return act_fwd_t<float>(act, pre, bias, pre_out, hidden, T * F, F, dropout_p, seed, stream);
    case DType::kFloat16: return act_fwd_t<__half>(act, pre, bias, pre_out, hidden, T * F, F, dropout_p, seed, stream);
    default: return act_fwd_t<__nv_bfloat16>(act, pre, bias, pre_out, hidden, T * F, F, dropout_p, seed, stream);
  }
}

cudaError_t ffn_activation_backward(DType dtype, Activation act, const void* pre, const void* d_hidden_dropped,
                                    void* hidden_out, void* dpre, int64_t T, int64_t F, float dropout_p,
                                    DropoutKey seed, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return act_bwd_t<float>(act, pre, d_hidden_dropped, hidden_out, dpre, T * F, dropout_p, seed, stream);
    case DType::kFloat16:
      return act_bwd_t<__half>(act, pre, d_hidden_dropped, hidden_out, dpre, T * F, dropout_p, seed, stream);
    default:
      return act_bwd_t<__nv_bfloat16>(act, pre, d_hidden_dropped, hidden_out, dpre, T * F, dropout_p, seed, stream);
  }
}

}  // namespace cuda
}  // namespace fastattn
