// Run-time choice and call counters of the AVX512-BF16 dot-product paths (see bf16dot.h), and
// their introspection ops: torch.ops.fastattn_bf16dot.{available, attn_fwd_calls, attn_bwd_calls,
// ffn_fwd_calls, ffn_bwd_calls}.
#include "cpu/bf16dot.h"

#include <torch/library.h>

#include <atomic>
#include <cstdlib>

namespace fastattn::bf16dot {
namespace {
std::atomic<int64_t> g_attn_fwd{0}, g_attn_bwd{0}, g_ffn_fwd{0}, g_ffn_bwd{0};
}  // namespace

bool cpu_has_bf16dot() {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return ok;
#else
  return false;
#endif
}

bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("FASTATTN_CPU_BF16DOT");
    if (env != nullptr && env[0] == '0') return false;
    return cpu_has_bf16dot();
  }();
  return on;
}

void count_attn_fwd() { g_attn_fwd.fetch_add(1, std::memory_order_relaxed); }
void count_attn_bwd() { g_attn_bwd.fetch_add(1, std::memory_order_relaxed); }
void count_ffn_fwd() { g_ffn_fwd.fetch_add(1, std::memory_order_relaxed); }
void count_ffn_bwd() { g_ffn_bwd.fetch_add(1, std::memory_order_relaxed); }

namespace {
bool available() { return enabled(); }
int64_t attn_fwd_calls() { return g_attn_fwd.load(); }
int64_t attn_bwd_calls() { return g_attn_bwd.load(); }
int64_t ffn_fwd_calls() { return g_ffn_fwd.load(); }
int64_t ffn_bwd_calls() { return g_ffn_bwd.load(); }
}  // namespace

}  // namespace fastattn::bf16dot

TORCH_LIBRARY(fastattn_bf16dot, m) {
  m.def("available() -> bool", &fastattn::bf16dot::available);
  m.def("cpu_has_bf16dot() -> bool", &fastattn::bf16dot::cpu_has_bf16dot);
  m.def("attn_fwd_calls() -> int", &fastattn::bf16dot::attn_fwd_calls);
  m.def("attn_bwd_calls() -> int", &fastattn::bf16dot::attn_bwd_calls);
  m.def("ffn_fwd_calls() -> int", &fastattn::bf16dot::ffn_fwd_calls);
  m.def("ffn_bwd_calls() -> int", &fastattn::bf16dot::ffn_bwd_calls);
}
