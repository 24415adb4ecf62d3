// The CPU decoding path of torch.ops.fastattn.attention_fwd (flash-decoding): few query rows
// (L <= 16) against many keys, as in generation against a KV cache.
//
// Work: one task = (batch, kv head, chunk of keys). The chunk length depends on the shape only
// (never on the thread count), so every result is bitwise the same whatever the number of
// threads: each task writes its chunk's unnormalised output, running max and sum, and a second
// pass combines the chunks of each row in chunk order. The query heads that share a kv head (GQA)
// are processed together as one block of group * L rows, so each K/V row is read once per group;
// the micro-kernels are shaped for that handful of rows (csrc/cpu/attention_decode_kernel.h).
// float32 K/V are read in place; bfloat16 K/V on a CPU with AVX512_BF16 are read in place by
// vdpbf16ps kernels (products exact, sums in float32, P rounded to bf16 for P V), float16 (and
// bfloat16 elsewhere) are converted to float32 a 64-key sub-block at a time; float64 runs in float64
// (portable code). q, k, v and out are read and written through their strides (any views
// whose last dim is contiguous: heads viewed in a projection's rows, a slice of a longer KV cache). Semantics are the kernel contract's (fastattn/backends/README.md):
// attn_mask read through its strides, top-left causality, key_padding_mask (wholly padded key
// blocks skipped), dropout by the shared Philox counter, rows that see no key give out 0, lse +inf.
//
// The kernels are compiled for AVX-512 and for any x86-64 / any CPU under `#pragma GCC target`
// in their own namespaces, and picked at run time as attention.cpp picks its own (torch's CPU
// capability, FASTATTN_CPU_ISA overrides; AVX2 machines run the portable code compiled for AVX2);
// a fourth build adds AVX512_BF16 for bf16 K/V, taken when fastattn::bf16dot::enabled().
// FASTATTN_CPU_DECODE=0 (read once) turns the path off; FASTATTN_CPU_DECODE_CHUNK (read per call,
// for tuning) sets the chunk length, FASTATTN_CPU_DECODE_SPAN (per call) the keys per softmax step, FASTATTN_CPU_DECODE_PREFETCH (per call) the software prefetch
// distance in bytes of K (and of V) ahead (default 16384 for float32/64; 0 = off, the default for
// 16-bit K/V), FASTATTN_CPU_DECODE_PF_HINT (per call) its locality (__builtin_prefetch's 0-3; default
// 1, prefetcht2), FASTATTN_CPU_DECODE_PF_STEP (per call) the bytes between its touches (default
// 4096: one line per page; 64: every line), FASTATTN_CPU_DECODE_ORDER (per call) 1 (the default) to have each thread run its
// tasks last to first on every other call (the rows it read last are the likeliest to be still
// cached; results do not change), 0 first to last always, FASTATTN_CPU_DECODE_QK_ROWS (per call) the order of the Q K^T loads of a block's
// first row: 1 (the default) key by key, 0 the 16 keys' columns in step.
// torch.ops.fastattn_decode.fwd_calls() counts the calls served.
#include "tuning.h"
#include "cpu/attention_common.h"
#include "cpu/attention_decode.h"
#include "cpu/bf16dot.h"

#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
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
#define FASTATTN_DEC_X86 1
#endif

#include "philox.h"

namespace fastattn {
namespace cpu_attn {
namespace decode {

// The inputs (attention_common.h) and the decoding path's own plan and buffers.
struct DecodeParams : AttnInputs {
  int64_t kend = 0;     // keys any query can see: S, or min(S, L) when causal
  int64_t chunk = 0;    // keys per task
  int64_t nchunks = 1;  // chunks per (batch, kv head)
  int64_t span = 64;    // keys per online-softmax step inside a chunk (a multiple of 64, <= chunk)
  int64_t rows = 0;     // N * Hq * L
  int64_t prefetch_bytes = 0;  // software prefetch of K and V rows this many bytes ahead (0: none)
  int64_t prefetch_step = 4096;  // bytes between its touches (64: every line; 4096: one per page)
  int prefetch_hint = 1;       // its __builtin_prefetch locality (3: prefetcht0, 1: prefetcht2)
  bool reverse = false;  // each thread runs its tasks from the last to the first (every other call, see fwd)
  bool qk_row_order = true;  // Q K^T loads key by key (attention_decode_kernel.h qk_row16)
  void* out = nullptr;  // (N, Hq, L, Ev), q's dtype; element (b,h,i,e) at b*osb + h*osh + i*osl + e
  int64_t osb = 0, osh = 0, osl = 0;
  float* lse = nullptr; // (N, Hq, L) contiguous
  void* o_part = nullptr;   // (nchunks, N, Hq, L, Ev) compute type, when nchunks > 1
  void* ml_part = nullptr;  // (nchunks, N, Hq, L, 2) compute type: the chunk's max and sum
};

using TaskFn = void (*)(const DecodeParams&, int64_t, int64_t);

// Whether keys [j0, j1) are all padded (kpm: one batch row's key_padding_mask, true = ignore): such
// 64-key blocks are skipped by the kernels and cost nothing in run_decode_tasks' split.
inline bool dec_all_padded(const bool* kpm, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j)
    if (!kpm[j]) return false;
  return true;
}

#if defined(FASTATTN_DEC_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2")
namespace avx512 {
#define FA_DEC_AVX512 1
#include "attention_decode_kernel.h"
#undef FA_DEC_AVX512
}  // namespace avx512
#pragma GCC pop_options

// bf16 K/V on vdpbf16ps (AVX512_BF16), picked at run time where the CPU has it (bf16dot::enabled())
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,avx2,fma,f16c,bmi,bmi2")
namespace avx512bf16 {
#define FA_DEC_AVX512 1
#define FA_DEC_BF16DOT 1
#include "attention_decode_kernel.h"
#undef FA_DEC_BF16DOT
#undef FA_DEC_AVX512
}  // namespace avx512bf16
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
namespace avx2 {
#include "attention_decode_kernel.h"
}  // namespace avx2
#pragma GCC pop_options
#define FASTATTN_DEC_HAVE_WIDE 1
#endif

namespace base {
#include "attention_decode_kernel.h"
}  // namespace base

struct DecodeKernels {
  TaskFn f32, bf16, f16, f64, c_f32, c_bf16, c_f16, c_f64;
};

#define FA_DEC_SET(ns) \
  DecodeKernels{&ns::dec_f32, &ns::dec_bf16, &ns::dec_f16, &ns::dec_f64, &ns::comb_f32, &ns::comb_bf16, &ns::comb_f16, &ns::comb_f64}

// The kernels of one instruction set (base where this build has no wider ones).
DecodeKernels kernels_for(Isa isa) {
#if defined(FASTATTN_DEC_HAVE_WIDE)
  if (isa == Isa::kAvx512) return FA_DEC_SET(avx512);
  if (isa == Isa::kAvx2) return FA_DEC_SET(avx2);
#endif
  (void)isa;
  return FA_DEC_SET(base);
}

bool bf16dot_on();

// The widest set this CPU runs and the user allows (the same choice as attention.cpp's); with AVX-512,
// bf16 K/V on vdpbf16ps where the CPU has AVX512_BF16 and FASTATTN_CPU_BF16DOT is not 0.
const DecodeKernels& pick_kernels() {
  static const DecodeKernels sets[4] = {kernels_for(Isa::kDefault), kernels_for(Isa::kAvx2),
                                        kernels_for(Isa::kAvx512), [] {
                                          DecodeKernels k = kernels_for(Isa::kAvx512);
#if defined(FASTATTN_DEC_HAVE_WIDE)
                                          k.bf16 = &avx512bf16::dec_bf16;
#endif
                                          return k;
                                        }()};
  const Isa isa = chosen_isa();
  return sets[isa == Isa::kAvx512 && bf16dot_on() ? 3 : static_cast<int>(isa)];
}

std::atomic<int64_t> g_fwd_calls{0}, g_bf16dot_calls{0};

// Whether bf16 K/V take the vdpbf16ps kernels (AVX-512 builds on a CPU with AVX512_BF16).
bool bf16dot_on() {
#if defined(FASTATTN_DEC_HAVE_WIDE)
  return fastattn::bf16dot::enabled();
#else
  return false;
#endif
}

bool enabled() {
  static const bool on = [] {
    const char* env = std::getenv("FASTATTN_CPU_DECODE");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::atoll(v) : fallback;
}

// Keys per task, from the shape only: enough chunks that there are about 64 tasks (so up to a few
// dozen threads have work), but at least 256 keys each (the combine and per-task setup stay small).
int64_t choose_chunk(int64_t heads, int64_t kend) {
  int64_t chunk = env_int("FASTATTN_CPU_DECODE_CHUNK", 0);
  if (chunk <= 0) {
    const int64_t splits = std::max<int64_t>(1, (64 + heads - 1) / heads);
    chunk = std::max<int64_t>(256, (kend + splits - 1) / splits);
  }
  TORCH_CHECK(chunk >= 1, "attention (cpu): FASTATTN_CPU_DECODE_CHUNK must be >= 1, got ", chunk);
  chunk = (chunk + 63) / 64 * 64;  // whole kernel blocks
  return std::min(chunk, std::max<int64_t>(64, (kend + 63) / 64 * 64));
}

// Keys per online-softmax step, from the shape only: a chunk is walked in spans, each one pass of
// Q K^T over the span's keys (K only), one softmax step per row, one pass of P V (V only). Long
// spans keep each stream long (one K stream, then one V stream, instead of switching every 64 keys)
// and cost fewer max/rescale steps; the span's scores (rows x span floats) stay within 32 KB.
// measured (issue 11, N4 H16 S1024 E64 float32, 2 threads, Zen 4, quiet): spans of 1024 keys
// instead of 64 took the call from 0.54-0.63 ms to 0.44-0.54 ms over three fresh processes each,
// and K/V resident in L3 (N1 H32) from 184 to 143-147 us.
int64_t choose_span(int64_t chunk, int64_t rows) {
  int64_t span = env_int("FASTATTN_CPU_DECODE_SPAN", 0);
  if (span <= 0) span = 8192 / std::max<int64_t>(1, rows);
  span = std::max<int64_t>(64, span / 64 * 64);
  return std::min(span, chunk);  // chunk is a multiple of 64
}

// The tasks split among the threads in contiguous ranges of (about) equal cost, the same ranges on
// every call of the same shape: thread i reads the same K/V rows each time, so what stays cached of
// them (its own L2, the L3) serves it again, where a shared queue (run_tasks) hands a task to
// whichever thread is free and the other core's L2 holds its rows. The cost of a task is its chunk's
// 64-key blocks that are not wholly padded (all equal without key padding). With p.reverse each
// thread runs its range last to first: the rows it read last are the likeliest to be cached still.
// Results do not depend on the split or the order (each task writes its own partial).
// measured (issue 11, N4 H16 S1024 E64 float32, 2 threads, quiet, same process, blocks of calls):
// 0.448-0.453 ms with the shared queue, 0.319-0.331 with fixed ranges, 0.299-0.310 with fixed ranges
// and alternating order; K/V resident in L3 (N1 H32): 0.156 -> 0.139 ms.
void run_decode_tasks(TaskFn task, const DecodeParams& p, int64_t ntasks) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (threads <= 1) {
    task(p, 0, ntasks);
    return;
  }
  std::vector<int64_t> bounds(threads + 1, ntasks);
  bounds[0] = 0;
  if (p.kpm == nullptr) {
    for (int64_t i = 1; i < threads; ++i) bounds[i] = i * ntasks / threads;
  } else {
    // cost of task (b, hk, c) = live 64-key blocks of chunk c in batch row b (at least 1)
    std::vector<int64_t> cost_bc(p.N * p.nchunks);
    for (int64_t b = 0; b < p.N; ++b)
      for (int64_t c = 0; c < p.nchunks; ++c) {
        int64_t live = 0;
        const int64_t hi = std::min(p.kend, (c + 1) * p.chunk);
        for (int64_t j0 = c * p.chunk; j0 < hi; j0 += 64)
          live += dec_all_padded(p.kpm + b * p.S, j0, std::min(hi, j0 + 64)) ? 0 : 1;
        cost_bc[b * p.nchunks + c] = std::max<int64_t>(1, live);
      }
    const auto cost = [&](int64_t t) {  // task t = (b * Hkv + hk) * nchunks + c
      return cost_bc[(t / (p.nchunks * p.Hkv)) * p.nchunks + t % p.nchunks];
    };
    int64_t total = 0;
    for (int64_t t = 0; t < ntasks; ++t) total += cost(t);
    int64_t acc = 0, i = 1;
    for (int64_t t = 0; t < ntasks && i < threads; ++t) {
      acc += cost(t);
      while (i < threads && acc * threads >= i * total) bounds[i++] = t + 1;
    }
    for (; i < threads; ++i) bounds[i] = ntasks;
  }
  at::parallel_for(0, threads, 1, [&](int64_t a, int64_t e) {
    for (int64_t i = a; i < e; ++i)
      if (bounds[i] < bounds[i + 1]) task(p, bounds[i], bounds[i + 1]);
  });
}

bool fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
         const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal, double scale,
         const std::optional<at::Tensor>& seed, at::Tensor& out, at::Tensor& lse) {
  const int64_t L = q.size(2);
  if (!enabled() || L > 16 || L < 1) return false;
  const auto dt = q.scalar_type();
  if (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf && dt != at::kDouble) return false;
  DecodeParams p;
  fill_inputs(p, q, k, v, mask, key_padding_mask, dropout_p, is_causal, scale, seed);
  p.out = out.data_ptr();
  p.osb = out.stride(0);
  p.osh = out.stride(1);
  p.osl = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.rows = p.N * p.Hq * p.L;
  p.kend = is_causal ? std::min(p.S, p.L) : p.S;
  const int64_t heads = p.N * p.Hkv;
  p.chunk = choose_chunk(heads, p.kend);
  // measured (issue 11, N4 H16 S1024 E64 float32, 1 thread on a loaded 2-core Zen 4 with 32 KB L1,
  // against sum(k) + sum(v) in the same rounds, 64-key steps): every line 16 KB ahead into L1 0.57 of
  // the sum's speed, none 0.78-0.81, every line 4 KB ahead with prefetcht2 0.93 but 0.46 (none: 0.69)
  // when K/V sit in L3; one line per page 4 KB ahead with prefetcht2 0.89-0.90, and 0.68 in L3. With
  // spans (one K stream, then one V stream; 2 threads, quiet, interleaved blocks of calls in one
  // process): one line per page 16 KB ahead (the default) 0.415-0.444 ms against 0.463-0.505 at 4 KB,
  // 0.42-0.43 at 32 KB; every line (PF_STEP 64) or prefetcht0 no better. 16-bit K/V: their converted
  // blocks already keep the loads ahead (off by default)
  p.prefetch_bytes = std::max<int64_t>(0, env_int("FASTATTN_CPU_DECODE_PREFETCH", q.element_size() >= 4 ? 16384 : 0));
  p.prefetch_hint = static_cast<int>(std::clamp<int64_t>(env_int("FASTATTN_CPU_DECODE_PF_HINT", 1), 0, 3));
  p.prefetch_step = std::max<int64_t>(64, env_int("FASTATTN_CPU_DECODE_PF_STEP", 4096)) / 64 * 64;
  p.qk_row_order = env_int("FASTATTN_CPU_DECODE_QK_ROWS", 1) != 0;
  {  // every other call each thread runs its tasks last to first (see run_decode_tasks)
    static std::atomic<uint64_t> calls{0};
    p.reverse = env_int("FASTATTN_CPU_DECODE_ORDER", 1) == 1 && (calls.fetch_add(1) & 1) != 0;
  }
  p.nchunks = std::max<int64_t>(1, (p.kend + p.chunk - 1) / p.chunk);
  p.span = choose_span(p.chunk, (p.Hq / p.Hkv) * p.L);
  const auto ct = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor o_part, ml_part;
  if (p.nchunks > 1) {
    o_part = at::empty({p.nchunks, p.rows, p.Ev}, q.options().dtype(ct));
    ml_part = at::empty({p.nchunks, p.rows, 2}, q.options().dtype(ct));
    p.o_part = o_part.data_ptr();
    p.ml_part = ml_part.data_ptr();
  }
  const DecodeKernels& ks = pick_kernels();
  TaskFn task = ks.f32, comb = ks.c_f32;
  if (dt == at::kBFloat16) {
    task = ks.bf16;
    comb = ks.c_bf16;
  } else if (dt == at::kHalf) {
    task = ks.f16;
    comb = ks.c_f16;
  } else if (dt == at::kDouble) {
    task = ks.f64;
    comb = ks.c_f64;
  }
  if (p.kend == 0) {  // causal with S == 0 cannot happen (S >= 1); kept for safety: no key at all
    out.zero_();
    lse.fill_(std::numeric_limits<float>::infinity());
  } else {
    run_decode_tasks(task, p, heads * p.nchunks);
    if (p.nchunks > 1) {
      at::parallel_for(0, p.rows, 16, [&](int64_t r0, int64_t r1) { comb(p, r0, r1); });
    }
  }
  g_fwd_calls.fetch_add(1);
#if defined(FASTATTN_DEC_HAVE_WIDE)
  if (task == &avx512bf16::dec_bf16) g_bf16dot_calls.fetch_add(1);  // the vdpbf16ps kernels served it
#endif
  return true;
}

int64_t fwd_calls() { return g_fwd_calls.load(); }
int64_t bf16dot_calls() { return g_bf16dot_calls.load(); }

}  // namespace decode
}  // namespace cpu_attn
}  // namespace fastattn

FASTATTN_CPU_PATH_OPS(fastattn_decode, enabled, &fastattn::cpu_attn::decode::enabled,
                      &fastattn::cpu_attn::decode::fwd_calls)

// The calls whose bf16 K/V ran on vdpbf16ps (tests assert the path served them).
TORCH_LIBRARY_FRAGMENT(fastattn_decode, m) {
  m.def("bf16dot_calls() -> int", &fastattn::cpu_attn::decode::bf16dot_calls);
}
