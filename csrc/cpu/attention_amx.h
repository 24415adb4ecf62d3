// bfloat16 attention forward on AMX (oneDNN's brgemm through at::native::cpublas), for CPUs with
// amx_bf16 and avx512_bf16. See attention_amx.cpp.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastattn {
namespace cpu_attn {
namespace amx {

// Computes the bfloat16 forward into out (N, Hq, L, Ev) and lse (N, Hq, L) and returns true, or
// returns false without touching them when this path cannot serve the call (no AMX, no bf16
// brgemm in this torch, FASTATTN_CPU_AMX=0, not bfloat16): the caller then runs its own kernels.
// Inputs as attention_fwd_cpu gets them after its checks; mask is an undefined tensor when absent.
bool fwd_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
              const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal,
              double scale, const std::optional<at::Tensor>& seed, at::Tensor& out, at::Tensor& lse);

}  // namespace amx
}  // namespace cpu_attn
}  // namespace fastattn
