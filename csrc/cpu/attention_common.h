// What the CPU attention paths of attention.cpp (the general kernels) and attention_decode.cpp (the
// decoding path) share: the call's inputs as raw pointers, the instruction set to run, the task
// runner, and the introspection ops of a path that tests count calls through.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <optional>
#include <string>

#include "tuning.h"

namespace fastattn {
namespace cpu_attn {

// The call's inputs (q, k, v in their own dtype, read in place).
struct AttnInputs {
  int64_t N = 0, Hq = 0, Hkv = 0, L = 0, S = 0, E = 0, Ev = 0;
  const void* q = nullptr;  // (N, Hq, L, E)
  const void* k = nullptr;  // (N, Hkv, S, E)
  const void* v = nullptr;  // (N, Hkv, S, Ev)
  // element strides of q, k, v's first three dims (the last is contiguous); the general kernels
  // (attention_kernel.h) take contiguous tensors and do not read them, the decoding path does
  int64_t qsb = 0, qsh = 0, qsl = 0, ksb = 0, ksh = 0, kss = 0, vsb = 0, vsh = 0, vss = 0;
  // additive, of dtype expected_mask_dtype(q) (checks.h); element (b,h,i,j) at b*msb + h*msh + i*msl + j*mss
  const void* mask = nullptr;
  int64_t msb = 0, msh = 0, msl = 0, mss = 0;
  const bool* kpm = nullptr;  // (N, S), true = key ignored
  double dropout_p = 0;
  uint64_t seed = 0;
  bool causal = false;
  double scale = 1;
};

// p's inputs from the op's arguments (after csrc/checks.h's checks; mask undefined when absent).
inline void fill_inputs(AttnInputs& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& mask, const std::optional<at::Tensor>& key_padding_mask, double dropout_p,
                        bool is_causal, double scale, const std::optional<at::Tensor>& seed) {
  p.N = q.size(0);
  p.Hq = q.size(1);
  p.L = q.size(2);
  p.E = q.size(3);
  p.Hkv = k.size(1);
  p.S = k.size(2);
  p.Ev = v.size(3);
  // t's data and the strides of its first three dims (its fourth's too: w3, for the mask)
  const auto take = [](const at::Tensor& t, const void*& data, int64_t& w0, int64_t& w1, int64_t& w2,
                       int64_t* w3) {
    data = t.data_ptr();
    w0 = t.stride(0);
    w1 = t.stride(1);
    w2 = t.stride(2);
    if (w3 != nullptr) *w3 = t.stride(3);
  };
  take(q, p.q, p.qsb, p.qsh, p.qsl, nullptr);
  take(k, p.k, p.ksb, p.ksh, p.kss, nullptr);
  take(v, p.v, p.vsb, p.vsh, p.vss, nullptr);
  if (mask.defined()) take(mask, p.mask, p.msb, p.msh, p.msl, &p.mss);
  if (key_padding_mask.has_value()) p.kpm = key_padding_mask->data_ptr<bool>();
  p.dropout_p = dropout_p;
  p.seed = dropout_p > 0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  p.causal = is_causal;
  p.scale = scale;
}

// The kernels' instruction sets, narrowest first.
enum class Isa : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set this CPU runs and the user allows: FASTATTN_CPU_ISA (csrc/tuning.h, may
// change at run time through set_tuning_knob), else torch's CPU capability (which honours
// ATEN_CPU_CAPABILITY); the CPU's own features are read once.
inline Isa chosen_isa() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  static const Isa torch_isa = [] {
    std::string c = at::get_cpu_capability();  // "AVX512", "AVX2" or "DEFAULT"
    for (auto& ch : c) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    return c == "avx512" ? Isa::kAvx512 : c == "avx2" ? Isa::kAvx2 : Isa::kDefault;
  }();
  static const Isa cpu_isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kDefault;
  }();
  Isa want = torch_isa;
  switch (tuning::get(tuning::Knob::kCpuIsa)) {
    case tuning::kIsaAvx512: want = Isa::kAvx512; break;
    case tuning::kIsaAvx2: want = Isa::kAvx2; break;
    case tuning::kIsaDefault: want = Isa::kDefault; break;
    default: break;
  }
  return std::min(want, cpu_isa);
#else
  return Isa::kDefault;
#endif
}

// Runs tasks [0, ntasks) of fn on torch's intra-op threads (at::parallel_for, so
// torch.set_num_threads holds), handing out small chunks from a shared counter instead of one fixed
// slice per thread: a thread the OS descheduled (a busy machine) no longer holds up the call. Tasks
// write disjoint outputs and each runs whole on one thread, so results do not depend on who ran it.
template <class Params>
void run_tasks(void (*fn)(const Params&, int64_t, int64_t), const Params& p, int64_t ntasks) {
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

}  // namespace cpu_attn
}  // namespace fastattn

// Introspection for the tests of one forward path: LIB::AVAIL() -> bool (whether the path can run
// here) and LIB::fwd_calls() -> int (how many forward calls it served), from AVAIL_FN and CALLS_FN.
#define FASTATTN_CPU_PATH_OPS(LIB, AVAIL, AVAIL_FN, CALLS_FN) \
  TORCH_LIBRARY(LIB, m) {                                     \
    m.def(#AVAIL "() -> bool", AVAIL_FN);                     \
    m.def("fwd_calls() -> int", CALLS_FN);                    \
  }
