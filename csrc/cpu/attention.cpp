// fastattn attention on the CPU: torch.ops.fastattn.attention_fwd / attention_bwd for CPU tensors.
//
// The kernels (csrc/cpu/attention_kernel.h) are compiled three times in this file, for AVX-512,
// AVX2+FMA and plain x86-64 / any CPU, each under `#pragma GCC target` in its own namespace; the
// instruction set is picked at run time (torch's own capability, so ATEN_CPU_CAPABILITY=avx2 or
// =default selects the narrower ones, and the tuning knob FASTATTN_CPU_ISA=avx512|avx2|default
// overrides it; csrc/tuning.h).
// Nothing is built with -march: the wheel runs on any x86-64.
//
// float32 and float64 run natively (float64 accumulates in float64); bfloat16 and float16 are read
// and written in place and computed in float32 (Q packed, K/V blocks converted as they are used).
// Work is split over torch's intra-op threads (at::parallel_for, honours torch.set_num_threads),
// chunks of tasks handed out dynamically:
//   forward  over (batch, query head, block of queries);
//   backward over (batch, kv head[, range of keys]) — each task owns its keys' dK/dV, and dQ is
//            either owned too or written per key range and summed in a fixed order, so results do
//            not depend on scheduling.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTATTN_X86 1
#endif

#include "checks.h"
#include "philox.h"
#include "tuning.h"
#include "cpu/attention_amx.h"
#include "cpu/bf16dot.h"
#include "cpu/vec_exp.h"
#include "cpu/attention_common.h"
#include "cpu/attention_decode.h"

namespace fastattn {
namespace cpu_attn {

// Everything a kernel task needs: the inputs (attention_common.h) and, as raw pointers to contiguous
// buffers, out, dout, o, dq, dk, dv in the input dtype (read and written in place), dq_part in the
// compute type T (float, or double for float64), lse always float.
struct AttnParams : AttnInputs {
  int64_t bm = 64, bn = 64;  // query / key block sizes
  // forward outputs
  void* out = nullptr;  // (N, Hq, L, Ev)
  float* lse = nullptr; // (N, Hq, L); backward input
  // backward
  const void* dout = nullptr;  // (N, Hq, L, Ev)
  const void* o = nullptr;     // (N, Hq, L, Ev)
  void* dq = nullptr;          // (N, Hq, L, E)
  void* dk = nullptr;          // (N, Hkv, S, E)
  void* dv = nullptr;          // (N, Hkv, S, Ev)
  int64_t key_parts = 1;       // key ranges per (b, kv head) in the backward
  void* dq_part = nullptr;     // (key_parts, N, Hq, L, E) when key_parts > 1
};

using TaskFn = void (*)(const AttnParams&, int64_t, int64_t);

struct KernelSet {
  const char* name;
  TaskFn fwd_f32, fwd_f64, fwd_bf16, fwd_f16, bwd_f32, bwd_f64, bwd_bf16, bwd_f16;
  int lanes_f32;
};

#if defined(FASTATTN_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2")
namespace avx512 {
#define FA_VEC_AVX512 1
#include "attention_kernel.h"
#undef FA_VEC_AVX512
}  // namespace avx512
#pragma GCC pop_options

// AVX-512 plus bf16 dot products (attention_bf16dot.h): the bfloat16 forward and backward, chosen
// when the CPU has avx512_bf16 (csrc/cpu/bf16dot.h; FASTATTN_CPU_BF16DOT=0 turns it off).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,avx512bf16")
namespace avx512bf16 {
#define FA_VEC_AVX512 1
#define FA_HELPERS_ONLY 1
#include "attention_kernel.h"
#include "attention_bf16dot.h"
#undef FA_HELPERS_ONLY
#undef FA_VEC_AVX512
}  // namespace avx512bf16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace avx2 {
#define FA_VEC_AVX2 1
#include "attention_kernel.h"
#undef FA_VEC_AVX2
}  // namespace avx2
#pragma GCC pop_options
#define FASTATTN_HAVE_WIDE 1
#endif

namespace base {
#include "attention_kernel.h"
}  // namespace base

#define FA_SET(ns)                                                                              \
  KernelSet{#ns,          &ns::fwd_f32, &ns::fwd_f64, &ns::fwd_bf16, &ns::fwd_f16, &ns::bwd_f32, \
            &ns::bwd_f64, &ns::bwd_bf16, &ns::bwd_f16, ns::lanes_f32()}

TaskFn pick_fwd(const KernelSet& ks, at::ScalarType dt) {
  switch (dt) {
    case at::kDouble: return ks.fwd_f64;
    case at::kBFloat16: return ks.fwd_bf16;
    case at::kHalf: return ks.fwd_f16;
    default: return ks.fwd_f32;
  }
}

TaskFn pick_bwd(const KernelSet& ks, at::ScalarType dt) {
  switch (dt) {
    case at::kDouble: return ks.bwd_f64;
    case at::kBFloat16: return ks.bwd_bf16;
    case at::kHalf: return ks.bwd_f16;
    default: return ks.bwd_f32;
  }
}

// The kernel set of one instruction set (base where this build has no wider ones).
KernelSet kernels_for(Isa isa) {
#if defined(FASTATTN_HAVE_WIDE)
  if (isa == Isa::kAvx512) {
    KernelSet ks = FA_SET(avx512);
    if (bf16dot::enabled()) {
      ks.fwd_bf16 = &avx512bf16::fwd_bf16_dot;
      ks.bwd_bf16 = &avx512bf16::bwd_bf16_dot;
      ks.name = "avx512bf16";
    }
    return ks;
  }
  if (isa == Isa::kAvx2) return FA_SET(avx2);
#endif
  (void)isa;
  return FA_SET(base);
}

// The widest kernel set this CPU runs and the user allows (attention_common.h's chosen_isa).
const KernelSet& pick_kernels() {
  static const KernelSet sets[3] = {kernels_for(Isa::kDefault), kernels_for(Isa::kAvx2), kernels_for(Isa::kAvx512)};
  return sets[static_cast<int>(chosen_isa())];
}

// Whether fn is a bf16 dot-product kernel (counted for the tests), and the bf16 kernel to use
// when it cannot run (an odd FASTATTN_CPU_BN).
bool is_bf16dot(TaskFn fn) {
#if defined(FASTATTN_HAVE_WIDE)
  return fn == &avx512bf16::fwd_bf16_dot || fn == &avx512bf16::bwd_bf16_dot;
#else
  (void)fn;
  return false;
#endif
}

TaskFn bf16_fallback(bool backward) {
#if defined(FASTATTN_HAVE_WIDE)
  return backward ? &avx512::bwd_bf16 : &avx512::fwd_bf16;
#else
  return backward ? &base::bwd_bf16 : &base::fwd_bf16;
#endif
}

// Block sizes: BM queries (a multiple of 16, every lane count) by BN keys; the tuning knobs
// FASTATTN_CPU_BM / _BN (csrc/tuning.h, range-checked there).
void choose_blocks(AttnParams& p) {
  p.bm = tuning::get(tuning::Knob::kCpuBm);
  p.bn = tuning::get(tuning::Knob::kCpuBn);
}

// What these kernels serve; the checks themselves are csrc/checks.h's.
const Serves& cpu_serves() {
  static const Serves s{c10::DeviceType::CPU, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf},
                        std::numeric_limits<int64_t>::max(), /*strided_rows=*/true};
  return s;
}


void fill_common(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& mask, const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                 bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
  fill_inputs(p, q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  choose_blocks(p);
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in,
                                                     const std::optional<at::Tensor>& attn_mask,
                                                     const std::optional<at::Tensor>& key_padding_mask,
                                                     double dropout_p, bool is_causal, double scale,
                                                     const std::optional<at::Tensor>& seed) {
  check_attention_args(q_in, k_in, v_in, attn_mask, key_padding_mask, dropout_p, seed, cpu_serves());
  const auto dt = q_in.scalar_type();
  // read in place in the compute type (float32 for 16-bit q); a mask in q's own dtype is widened
  const at::Tensor mask = !attn_mask.has_value() ? at::Tensor()
                          : attn_mask->scalar_type() == expected_mask_dtype(dt) ? *attn_mask
                                                                          : attn_mask->to(expected_mask_dtype(dt));
  const int64_t N = q_in.size(0), Hq = q_in.size(1), L = q_in.size(2), Ev = v_in.size(3);
  // out (N, Hq, L, Ev): contiguous for a contiguous q; else laid out (N, L, Hq, Ev), as torch's own CPU
  // flash attention does, so that a q viewed from a packed projection's rows gives an output the
  // out-projection reads without a copy (the fake kernel, fastattn/attention.py, says the same)
  at::Tensor out = q_in.is_contiguous() ? at::empty({N, Hq, L, Ev}, q_in.options())
                                        : at::empty({N, L, Hq, Ev}, q_in.options()).transpose(1, 2);
  at::Tensor lse = at::empty({N, Hq, L}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  // few query rows against many keys (attention_decode.cpp, reads and writes the views in place);
  // false means "not served here"
  if (decode::fwd(q_in, k_in, v_in, mask, key_padding_mask, dropout_p, is_causal, scale, seed, out, lse))
    return {out, lse};
  // the other kernels take contiguous tensors
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  at::Tensor out_c = out.is_contiguous() ? out : at::empty({N, Hq, L, Ev}, q.options());
  // bfloat16 on AMX (attention_amx.cpp) when the CPU has it; false means "not served here"
  if (dt == at::kBFloat16 &&
      amx::fwd_bf16(q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed, out_c, lse)) {
    if (!out_c.is_same(out)) out.copy_(out_c);
    return {out, lse};
  }
  AttnParams p;
  fill_common(p, q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  p.out = out_c.data_ptr();
  p.lse = lse.data_ptr<float>();
  const KernelSet& ks = pick_kernels();
  TaskFn fn = pick_fwd(ks, dt);
  if (is_bf16dot(fn) && p.bn % 2 != 0) fn = bf16_fallback(false);  // key pairs need an even BN
  const int64_t ntasks = N * Hq * ((L + p.bm - 1) / p.bm);
  run_tasks(fn, p, ntasks);
  if (is_bf16dot(fn)) bf16dot::count_attn_fwd();
  if (!out_c.is_same(out)) out.copy_(out_c);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal, double scale,
    const std::optional<at::Tensor>& seed) {
  const AttnShape shape =
      check_attention_args(q_in, k_in, v_in, attn_mask, key_padding_mask, dropout_p, seed, cpu_serves());
  check_attention_bwd_args(grad_out, out_in, lse_in, q_in, shape);
  const int64_t N = shape.N, Hq = shape.Hq, L = shape.L;
  const auto dt = q_in.scalar_type(), ct = expected_mask_dtype(dt);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor go = grad_out.contiguous(), o = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor mask = !attn_mask.has_value() ? at::Tensor()
                          : attn_mask->scalar_type() == ct ? *attn_mask : attn_mask->to(ct);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0 || go.numel() == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  AttnParams p;
  fill_common(p, q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  p.dout = go.data_ptr();
  p.o = o.data_ptr();
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  // Few (batch, kv head) pairs: split the keys into ranges so that every thread has work. The
  // split depends on the shape only (not on the thread count), so results are reproducible.
  const int64_t heads = p.N * p.Hkv;
  const int64_t kblocks = (p.S + p.bn - 1) / p.bn;
  p.key_parts = heads >= 16 ? 1 : std::max<int64_t>(1, std::min<int64_t>(kblocks, 16 / heads));
  at::Tensor dq_part;
  if (p.key_parts > 1) {
    dq_part = at::zeros({p.key_parts, N, Hq, L, p.E}, q.options().dtype(ct));
    p.dq_part = dq_part.data_ptr();
  }
  const KernelSet& ks = pick_kernels();
  TaskFn fn = pick_bwd(ks, dt);
  if (is_bf16dot(fn) && p.bn % 2 != 0) fn = bf16_fallback(true);  // key pairs need an even BN
  run_tasks(fn, p, heads * p.key_parts);
  if (is_bf16dot(fn)) bf16dot::count_attn_bwd();
  if (p.key_parts > 1) {
    // fixed summation order over key ranges, in the compute type, then one rounding to q's dtype
    at::Tensor sum = dq_part.select(0, 0).clone();
    for (int64_t r = 1; r < p.key_parts; ++r) sum.add_(dq_part.select(0, r));
    dq.copy_(sum);
  }
  return {dq, dk, dv};
}

}  // namespace cpu_attn
}  // namespace fastattn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &fastattn::cpu_attn::attention_fwd_cpu);
  m.impl("attention_bwd", &fastattn::cpu_attn::attention_bwd_cpu);
}
