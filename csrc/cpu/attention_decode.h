// The CPU decoding path of attention_fwd: few query rows (L <= 16) against many keys. See
// attention_decode.cpp.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastattn {
namespace cpu_attn {
namespace decode {

// Computes the forward into out (N, Hq, L, Ev) and lse (N, Hq, L) and returns true, or returns
// false without touching them when this path does not serve the call (L > 16, or
// FASTATTN_CPU_DECODE=0): the caller then runs its other kernels. Inputs as attention_fwd_cpu gets
// them after its checks (q, k, v any views whose last dim is contiguous; out any such view, lse
// contiguous); mask is an undefined tensor when absent.
bool fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
         const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal, double scale,
         const std::optional<at::Tensor>& seed, at::Tensor& out, at::Tensor& lse);

}  // namespace decode
}  // namespace cpu_attn
}  // namespace fastattn
