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
#include "cpu/attention_decode.h"

namespace fastattn {
namespace cpu_attn {

// Everything a kernel task needs, as raw pointers to contiguous buffers: q, k, v, the mask, out,
// dout, o, dq, dk, dv in the input dtype (read and written in place), dq_part in the compute type T
// (float, or double for float64), lse always float, kpm bool.
struct AttnParams {
  int64_t N = 0, Hq = 0, Hkv = 0, L = 0, S = 0, E = 0, Ev = 0;
  const void* q = nullptr;  // (N, Hq, L, E)
  const void* k = nullptr;  // (N, Hkv, S, E)
  const void* v = nullptr;  // (N, Hkv, S, Ev)
  // additive, of dtype expected_mask_dtype(q) (checks.h); element (b,h,i,j) at b*msb + h*msh + i*msl + j*mss
  const void* mask = nullptr;
  int64_t msb = 0, msh = 0, msl = 0, mss = 0;
  const bool* kpm = nullptr;  // (N, S), true = key ignored
  double dropout_p = 0;
  uint64_t seed = 0;
  bool causal = false;
  double scale = 1;
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

// The widest kernel set this CPU runs and the user allows.
KernelSet pick_kernels() {
  std::string want;
  switch (tuning::get(tuning::Knob::kCpuIsa)) {
    case tuning::kIsaAvx512: want = "avx512"; break;
    case tuning::kIsaAvx2: want = "avx2"; break;
    case tuning::kIsaDefault: want = "default"; break;
    default: want = at::get_cpu_capability(); break;  // "AVX512", "AVX2" or "DEFAULT"; honours ATEN_CPU_CAPABILITY
  }
  for (auto& c : want) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
#if defined(FASTATTN_HAVE_WIDE)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl");
  if (want == "avx512" && has_avx512) {
    KernelSet ks = FA_SET(avx512);
    if (bf16dot::enabled()) {
      ks.fwd_bf16 = &avx512bf16::fwd_bf16_dot;
      ks.bwd_bf16 = &avx512bf16::bwd_bf16_dot;
      ks.name = "avx512bf16";
    }
    return ks;
  }
  if ((want == "avx512" || want == "avx2") && has_avx2) return FA_SET(avx2);
#endif
  return FA_SET(base);
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

// Runs tasks [0, ntasks) of fn on torch's intra-op threads (at::parallel_for, so
// torch.set_num_threads holds), handing out small chunks from a shared counter instead of one fixed
// slice per thread: a thread the OS descheduled (a busy machine) no longer holds up the call. Tasks
// write disjoint outputs and each runs whole on one thread, so results do not depend on who ran it.
void run_tasks(TaskFn fn, const AttnParams& p, int64_t ntasks) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (threads <= 1) {
    fn(p, 0, ntasks);
    return;
  }
  // Guided chunks: a quarter of a thread's share of what is left, down to single tasks at the
  // end, so that the threads finish together (a backward task can be a whole (batch, head)).
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    int64_t b = next.load(std::memory_order_relaxed);
    for (;;) {
      if (b >= ntasks) break;
      const int64_t chunk = std::max<int64_t>(1, (ntasks - b) / (threads * 4));
      if (!next.compare_exchange_weak(b, b + chunk, std::memory_order_relaxed)) continue;
      fn(p, b, std::min(ntasks, b + chunk));
      b = next.load(std::memory_order_relaxed);
    }
  });
}

// Block sizes: BM queries (a multiple of 16, every lane count) by BN keys; the tuning knobs
// FASTATTN_CPU_BM / _BN (csrc/tuning.h, range-checked there).
void choose_blocks(AttnParams& p) {
  p.bm = tuning::get(tuning::Knob::kCpuBm);
  p.bn = tuning::get(tuning::Knob::kCpuBn);
}

// What these kernels serve; the checks themselves are csrc/checks.h's.
const Serves& cpu_serves() {
  static const Serves s{c10::DeviceType::CPU, {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}};
  return s;
}


void fill_common(AttnParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& mask, const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                 bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
  p.N = q.size(0);
  p.Hq = q.size(1);
  p.L = q.size(2);
  p.E = q.size(3);
  p.Hkv = k.size(1);
  p.S = k.size(2);
  p.Ev = v.size(3);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  if (mask.defined()) {
    p.mask = mask.data_ptr();
    p.msb = mask.stride(0);
    p.msh = mask.stride(1);
    p.msl = mask.stride(2);
    p.mss = mask.stride(3);
  }
  if (key_padding_mask.has_value()) p.kpm = key_padding_mask->data_ptr<bool>();
  p.dropout_p = dropout_p;
  p.seed = dropout_p > 0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  p.causal = is_causal;
  p.scale = scale;
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
  const at::Tensor &q = q_in, &k = k_in, &v = v_in;
  // read in place in the compute type (float32 for 16-bit q); a mask in q's own dtype is widened
  const at::Tensor mask = !attn_mask.has_value() ? at::Tensor()
                          : attn_mask->scalar_type() == expected_mask_dtype(dt) ? *attn_mask
                                                                          : attn_mask->to(expected_mask_dtype(dt));
  const int64_t N = q.size(0), Hq = q.size(1), L = q.size(2), Ev = v.size(3);
  at::Tensor out = at::empty({N, Hq, L, Ev}, q.options());
  at::Tensor lse = at::empty({N, Hq, L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  // few query rows against many keys (attention_decode.cpp); false means "not served here"
  if (decode::fwd(q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed, out, lse)) return {out, lse};
  // bfloat16 on AMX (attention_amx.cpp) when the CPU has it; false means "not served here"
  if (dt == at::kBFloat16 &&
      amx::fwd_bf16(q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed, out, lse))
    return {out, lse};
  AttnParams p;
  fill_common(p, q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  const KernelSet ks = pick_kernels();
  TaskFn fn = pick_fwd(ks, dt);
  if (is_bf16dot(fn) && p.bn % 2 != 0) fn = bf16_fallback(false);  // key pairs need an even BN
  const int64_t ntasks = N * Hq * ((L + p.bm - 1) / p.bm);
  run_tasks(fn, p, ntasks);
  if (is_bf16dot(fn)) bf16dot::count_attn_fwd();
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
  const at::Tensor &q = q_in, &k = k_in, &v = v_in;
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
  const KernelSet ks = pick_kernels();
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
