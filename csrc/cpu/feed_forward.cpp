// Fused feed-forward on the CPU: out = dropout(act(x @ w1^T + b1)) @ w2^T + b2, forward and backward.
//
// Token-tiled: tokens are cut into tiles of kTile rows, tiles are shared among threads with
// at::parallel_for, and each thread runs single-threaded GEMMs on its tile:
//   forward   h (tile, F) = x_tile @ w1^T  ->  bias, activation, dropout in place while h is in
//             cache (pre-activation written out only when it is saved for the backward)
//             ->  out_tile = h @ w2^T + b2. The (T, F) hidden is never written whole.
//   backward  dh = grad_out_tile @ w2  ->  recompute act / act' / dropout from the saved
//             pre-activation  ->  dpre = dh * keep * act'(pre), hid = act(pre) * keep
//             ->  dx_tile = dpre @ w1,  dW1^T += x_tile^T @ dpre,  dW2 += grad_out_tile^T @ hid.
//             Weight and bias gradients accumulate in one partial per token chunk (chunk size set by
//             the token count alone, tiles in order) and are summed in chunk order (BwdTiles): the
//             result is bitwise the same whatever the thread count.
// GEMMs: oneDNN's brgemm micro-kernel through at::native::cpublas::brgemm (float; as fast as MKL
// sgemm on these tile shapes here, without at::mm's per-call overhead), else at::mm on tile views
// (double, a torch without float brgemm, or the tuning knob FASTATTN_FFN_NO_BRGEMM=1). at::native::cpublas::gemm
// is no option: its float overload is not exported from libtorch_cpu.
// bfloat16 forward: on AMX (ffn_fwd_amx below) bf16 brgemm with fp32 accumulation; otherwise, and
// for the backward, bfloat16 inputs compute in float32 (converted per tile; weights once per call) and
// round the outputs; saved is bfloat16 and the forward uses that rounded pre-activation, as the
// backward does.
// Element-wise work (ffn_math.h) is compiled for AVX-512 / AVX2 / baseline and chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/amx_probe.h"
#include "cpu/ffn_math.h"
#include "cpu/bf16dot.h"
#include "tuning.h"

namespace fastattn::ffn {
namespace {

constexpr int64_t kFwdTile = 64;  // tokens per forward tile: (64, F) fp32 hidden stays in L2
constexpr int64_t kBwdTile = 64;  // tokens per backward tile (two (64, F) fp32 buffers)

// ------------------------------------------------------------------------------------------------
// GEMM: C (M, N) [+]= A (M, K) @ B (K, N), all row-major with leading dimensions, single-threaded
// when called inside at::parallel_for.

bool brgemm_usable() {
  if (tuning::get(tuning::Knob::kFfnNoBrgemm) != 0) return false;
  static const bool ok = [] {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
    try {
      float a[2] = {1.f, 2.f}, b[2] = {3.f, 4.f}, c[1] = {0.f};
      at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, false, a, b, c, false);
      return c[0] == 11.f;
    } catch (...) {
      return false;
    }
#else
    return false;  // this torch's CPUBlas.h has no float brgemm
#endif
  }();
  return ok;
}

template <typename T>
void gemm_fallback(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                   int64_t ldc, bool accumulate) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
          bool accumulate, bool use_brgemm) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    }
    return;
  }
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  if constexpr (std::is_same_v<T, float>) {
    if (use_brgemm) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
      return;
    }
  }
#endif
  gemm_fallback<T>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// Runs body(i) for i in [0, n) on torch's intra-op threads, each index once. With two or more
// threads the body always runs inside an active parallel region (the range is padded to at least
// two), so a BLAS call in it (the at::mm fallback GEMMs) runs single-threaded whatever the thread
// count: its result cannot depend on how many threads torch has.
template <typename Body>
void parallel_each(int64_t n, const Body& body) {
  at::parallel_for(0, std::max<int64_t>(n, 2), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < std::min(e, n); ++i) body(i);
  });
}

// ------------------------------------------------------------------------------------------------
// Element-wise epilogues, compiled per instruction set and picked at run time.

template <typename scalar_t, typename acc_t>
using FwdEpilogueFn = void (*)(int64_t, int64_t, acc_t*, const acc_t*, scalar_t*, uint64_t, uint64_t, float, acc_t,
                               acc_t*);
template <typename scalar_t, typename acc_t>
using BwdEpilogueFn = void (*)(int64_t, int64_t, acc_t*, const scalar_t*, acc_t*, acc_t*, uint64_t, uint64_t, float,
                               acc_t, acc_t*);

// One row per (non-inlined) call: GCC vectorises the row loops reliably only outside a row nest.
#define FFN_DEFINE_EPILOGUES(SUFFIX, AVX512, ATTR)                                                                     \
  template <typename scalar_t, typename acc_t, Act A, bool DROP>                                                \
  ATTR __attribute__((noinline)) void fwd_row_##SUFFIX(int64_t F, acc_t* h, const acc_t* b1, scalar_t* saved,   \
                                                       uint64_t seed, uint64_t off0, float p, acc_t scale,      \
                                                       acc_t* keep) {                                           \
    fwd_row_impl<scalar_t, acc_t, A, DROP, AVX512>(F, h, b1, saved, seed, off0, p, scale, keep);                        \
  }                                                                                                             \
  template <typename scalar_t, typename acc_t, Act A, bool DROP>                                                \
  ATTR void fwd_epilogue_##SUFFIX(int64_t rows, int64_t F, acc_t* h, const acc_t* b1, scalar_t* saved,          \
                                  uint64_t seed, uint64_t off0, float p, acc_t scale, acc_t* keep) {            \
    for (int64_t r = 0; r < rows; ++r)                                                                          \
      fwd_row_##SUFFIX<scalar_t, acc_t, A, DROP>(F, h + r * F, b1, saved != nullptr ? saved + r * F : nullptr,  \
                                                 seed, off0 + static_cast<uint64_t>(r * F), p, scale, keep);    \
  }                                                                                                             \
  template <typename scalar_t, typename acc_t, Act A, bool DROP>                                                \
  ATTR __attribute__((noinline)) void bwd_row_##SUFFIX(int64_t F, acc_t* dh, const scalar_t* pre, acc_t* hid,   \
                                                       acc_t* db1, uint64_t seed, uint64_t off0, float p,       \
                                                       acc_t scale, acc_t* keep) {                              \
    bwd_row_impl<scalar_t, acc_t, A, DROP, AVX512>(F, dh, pre, hid, db1, seed, off0, p, scale, keep);                   \
  }                                                                                                             \
  template <typename scalar_t, typename acc_t, Act A, bool DROP>                                                \
  ATTR void bwd_epilogue_##SUFFIX(int64_t rows, int64_t F, acc_t* dh, const scalar_t* pre, acc_t* hid,          \
                                  acc_t* db1, uint64_t seed, uint64_t off0, float p, acc_t scale, acc_t* keep) { \
    for (int64_t r = 0; r < rows; ++r)                                                                          \
      bwd_row_##SUFFIX<scalar_t, acc_t, A, DROP>(F, dh + r * F, pre + r * F, hid + r * F, db1, seed,            \
                                                 off0 + static_cast<uint64_t>(r * F), p, scale, keep);          \
  }

FFN_DEFINE_EPILOGUES(base, false, )
#if defined(__GNUC__) && defined(__x86_64__)
#define FFN_HAVE_X86_DISPATCH 1
FFN_DEFINE_EPILOGUES(avx2, false, __attribute__((target("avx2,fma,f16c,bmi2"))))
FFN_DEFINE_EPILOGUES(avx512, true, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))))
#endif

enum class Isa { Base, Avx2, Avx512 };

Isa detect_isa() {
  static const Isa isa = [] {
#if defined(FFN_HAVE_X86_DISPATCH)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
#endif
    return Isa::Base;
  }();
  return isa;
}

// The forward and backward epilogues of one activation, dropout flag and instruction set.
template <typename scalar_t, typename acc_t>
struct Epilogues {
  FwdEpilogueFn<scalar_t, acc_t> fwd;
  BwdEpilogueFn<scalar_t, acc_t> bwd;
};

template <typename scalar_t, typename acc_t, Act A, bool DROP>
Epilogues<scalar_t, acc_t> pick_isa() {
#if defined(FFN_HAVE_X86_DISPATCH)
  switch (detect_isa()) {
    case Isa::Avx512:
      return {&fwd_epilogue_avx512<scalar_t, acc_t, A, DROP>, &bwd_epilogue_avx512<scalar_t, acc_t, A, DROP>};
    case Isa::Avx2: return {&fwd_epilogue_avx2<scalar_t, acc_t, A, DROP>, &bwd_epilogue_avx2<scalar_t, acc_t, A, DROP>};
    default: break;
  }
#endif
  return {&fwd_epilogue_base<scalar_t, acc_t, A, DROP>, &bwd_epilogue_base<scalar_t, acc_t, A, DROP>};
}

template <typename scalar_t, typename acc_t, bool DROP>
Epilogues<scalar_t, acc_t> pick_act(Act a) {
  switch (a) {
    case Act::Relu: return pick_isa<scalar_t, acc_t, Act::Relu, DROP>();
    case Act::Gelu: return pick_isa<scalar_t, acc_t, Act::Gelu, DROP>();
    default: return pick_isa<scalar_t, acc_t, Act::GeluTanh, DROP>();
  }
}

template <typename scalar_t, typename acc_t>
Epilogues<scalar_t, acc_t> pick_epilogues(Act a, bool drop) {
  return drop ? pick_act<scalar_t, acc_t, true>(a) : pick_act<scalar_t, acc_t, false>(a);
}

// The epilogues with a call's activation and dropout bound: e(rows, t0, ...) runs a tile of rows
// tokens from token t0 (its Philox counters start at t0 * F). keep: F scratch values when drop.
template <typename scalar_t, typename acc_t>
struct BoundEpilogues {
  Epilogues<scalar_t, acc_t> fns;
  int64_t F;
  uint64_t seed;
  bool drop;
  float p;
  acc_t scale;  // 1 / (1 - p), 1 without dropout
  BoundEpilogues(Act act, double dropout_p, uint64_t seed_, int64_t F_)
      : fns(pick_epilogues<scalar_t, acc_t>(act, dropout_p > 0.0)),
        F(F_),
        seed(seed_),
        drop(dropout_p > 0.0),
        p(static_cast<float>(dropout_p)),
        scale(drop ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1)) {}
  // h = act(h + b1) (dropped), the pre-activation to saved when not null
  void fwd(int64_t rows, int64_t t0, acc_t* h, const acc_t* b1, scalar_t* saved, acc_t* keep) const {
    fns.fwd(rows, F, h, b1, saved, seed, static_cast<uint64_t>(t0) * static_cast<uint64_t>(F), p, scale, keep);
  }
  // dh -> d pre, hid = act(pre) (dropped), db1 += d pre
  void bwd(int64_t rows, int64_t t0, acc_t* dh, const scalar_t* pre, acc_t* hid, acc_t* db1, acc_t* keep) const {
    fns.bwd(rows, F, dh, pre, hid, db1, seed, static_cast<uint64_t>(t0) * static_cast<uint64_t>(F), p, scale, keep);
  }
  size_t keep_size() const { return drop ? static_cast<size_t>(F) : 0; }
};

// The biases in acc_t, contiguous; null pointers where absent.
template <typename acc_t>
struct AccBiases {
  at::Tensor b1, b2;
  const acc_t* b1_p = nullptr;
  const acc_t* b2_p = nullptr;
  AccBiases(const std::optional<at::Tensor>& bias1, const std::optional<at::Tensor>& bias2) {
    const auto t = c10::CppTypeToScalarType<acc_t>::value;
    if (bias1.has_value()) b1 = bias1->to(t).contiguous(), b1_p = b1.data_ptr<acc_t>();
    if (bias2.has_value()) b2 = bias2->to(t).contiguous(), b2_p = b2.data_ptr<acc_t>();
  }
};

// ------------------------------------------------------------------------------------------------
// Arguments: checked by csrc/checks.h against what these kernels serve.

const Serves& cpu_serves() {
  static const Serves s{c10::DeviceType::CPU, {at::kFloat, at::kBFloat16, at::kDouble}};
  return s;
}

// checks.h's activation as ffn_math.h's.
Act to_act(Activation a) {
  switch (a) {
    case Activation::kRelu: return Act::Relu;
    case Activation::kGelu: return Act::Gelu;
    default: return Act::GeluTanh;
  }
}

// acc_t copy of a (rows, cols) matrix, optionally transposed to (cols, rows), contiguous.
template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t, bool transpose) {
  const auto acc = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor s = transpose ? t.t() : t;
  return s.to(acc).contiguous();
}

// ------------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename acc_t>
void ffn_fwd_kernel(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                    const at::Tensor& w2, const std::optional<at::Tensor>& b2, Act act, double dropout_p,
                    uint64_t seed, const FfnShape& s, at::Tensor& out, at::Tensor* saved) {
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const int64_t T = s.T, D = s.D, F = s.F, D2 = s.D2;
  const at::Tensor w1t = as_acc<acc_t>(w1, true);  // (D, F)
  const at::Tensor w2t = as_acc<acc_t>(w2, true);  // (F, D2)
  const acc_t* w1t_p = w1t.data_ptr<acc_t>();
  const acc_t* w2t_p = w2t.data_ptr<acc_t>();
  const AccBiases<acc_t> bias(b1, b2);
  const acc_t *b1_p = bias.b1_p, *b2_p = bias.b2_p;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* saved_p = saved != nullptr ? saved->data_ptr<scalar_t>() : nullptr;
  const BoundEpilogues<scalar_t, acc_t> ep(act, dropout_p, seed, F);
  const bool use_brgemm = brgemm_usable();
  const int64_t ntiles = (T + kFwdTile - 1) / kFwdTile;

  // padded to two tiles at least: see parallel_each (the at::mm fallback runs single-threaded)
  at::parallel_for(0, std::max<int64_t>(ntiles, 2), 1, [&](int64_t begin, int64_t end) {
    end = std::min(end, ntiles);
    if (begin >= end) return;
    std::vector<acc_t> hbuf(static_cast<size_t>(kFwdTile * F));
    std::vector<acc_t> keep(ep.keep_size());
    std::vector<acc_t> xbuf(kSame ? 0 : static_cast<size_t>(kFwdTile * D));
    std::vector<acc_t> obuf(kSame ? 0 : static_cast<size_t>(kFwdTile * D2));
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kFwdTile;
      const int64_t rows = std::min(kFwdTile, T - t0);
      const acc_t* xa;
      if constexpr (kSame) {
        xa = x_p + t0 * D;
      } else {
        for (int64_t i = 0; i < rows * D; ++i) xbuf[i] = static_cast<acc_t>(x_p[t0 * D + i]);
        xa = xbuf.data();
      }
      gemm<acc_t>(rows, F, D, xa, D, w1t_p, F, hbuf.data(), F, false, use_brgemm);
      ep.fwd(rows, t0, hbuf.data(), b1_p, saved_p != nullptr ? saved_p + t0 * F : nullptr, keep.data());
      acc_t* o;
      if constexpr (kSame) {
        o = out_p + t0 * D2;
      } else {
        o = obuf.data();
      }
      if (b2_p != nullptr) {
        for (int64_t r = 0; r < rows; ++r) std::copy(b2_p, b2_p + D2, o + r * D2);
      }
      gemm<acc_t>(rows, D2, F, hbuf.data(), F, w2t_p, D2, o, D2, b2_p != nullptr, use_brgemm);
      if constexpr (!kSame) {
        for (int64_t i = 0; i < rows * D2; ++i) out_p[t0 * D2 + i] = static_cast<scalar_t>(o[i]);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// bfloat16 forward on AMX: both GEMMs as bf16 x bf16 -> fp32 brgemm (weights packed once per call
// in VNNI layout: pairs of K rows interleaved, odd K zero-padded), the same fp32 epilogue as the
// float path (bias, saved pre-activation, activation, dropout with the same Philox counters), the
// hidden tile rounded to bf16 for the second GEMM (as eager bf16 does). The tuning knob
// FASTATTN_FFN_AMX=0 turns it off; torch.ops.fastattn_ffn.amx_fwd_calls() counts the calls it served.

std::atomic<int64_t> g_amx_fwd_calls{0};

#if defined(FASTATTN_AMX_BUILD)
// AVX-512 F/BW for the packing and rounding code, and bf16 brgemm on AMX.
bool amx_hardware_ok() {
  static const bool isa = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  }();
  return isa && cpu::amx_bf16_brgemm_ok();
}
#endif

bool amx_enabled() {
#if defined(FASTATTN_AMX_BUILD)
  return tuning::get(tuning::Knob::kFfnAmx) != 0 && amx_hardware_ok();
#else
  return false;
#endif
}

#if defined(FASTATTN_AMX_BUILD)
// B (K, N) with B[k][n] = src[n * ld + k] (src is a row-major (N, K) weight), as VNNI (Kp/2, N, 2).
at::Tensor pack_vnni_transposed(const at::Tensor& w_nk, int64_t N, int64_t K) {
  const int64_t Kp = (K + 1) / 2 * 2;
  at::Tensor out = at::empty({Kp / 2, N, 2}, at::TensorOptions().dtype(at::kBFloat16));
  const at::Tensor w = w_nk.contiguous();
  const at::BFloat16* src = w.data_ptr<at::BFloat16>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  for (int64_t k2 = 0; k2 < Kp / 2; ++k2) {
    const int64_t k = 2 * k2;
    at::BFloat16* row = dst + k2 * N * 2;
    for (int64_t n = 0; n < N; ++n) {
      row[2 * n] = src[n * K + k];
      row[2 * n + 1] = k + 1 < K ? src[n * K + k + 1] : at::BFloat16(0.f);
    }
  }
  return out;
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void round_rows_bf16(
    int64_t rows, int64_t F, int64_t Fp, const float* __restrict__ h, at::BFloat16* __restrict__ hb) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = h + r * F;
    uint16_t* dst = reinterpret_cast<uint16_t*>(hb + r * Fp);
    int64_t f = 0;
    const __m512i bias = _mm512_set1_epi32(0x7fff);
    const __m512i one = _mm512_set1_epi32(1);
    for (; f + 16 <= F; f += 16) {
      // round to nearest even (inputs are finite or inf; NaN is kept a NaN by the quiet bit below)
      __m512i v = _mm512_castps_si512(_mm512_loadu_ps(src + f));
      __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(v, 16), one);
      __m512i r16 = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(v, bias), lsb), 16);
      const __mmask16 nan = _mm512_cmp_ps_mask(_mm512_castsi512_ps(v), _mm512_castsi512_ps(v), _CMP_UNORD_Q);
      r16 = _mm512_mask_mov_epi32(r16, nan, _mm512_set1_epi32(0x7fc0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + f), _mm512_cvtepi32_epi16(r16));
    }
    for (; f < F; ++f) hb[r * Fp + f] = at::BFloat16(src[f]);
    if (Fp > F) hb[r * Fp + F] = at::BFloat16(0.f);
  }
}

void ffn_fwd_amx(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                 const at::Tensor& w2, const std::optional<at::Tensor>& b2, Act act, double dropout_p, uint64_t seed,
                 const FfnShape& s, at::Tensor& out, at::Tensor* saved) {
  using scalar_t = c10::BFloat16;
  const int64_t T = s.T, D = s.D, F = s.F, D2 = s.D2;
  const int64_t Dp = (D + 1) / 2 * 2, Fp = (F + 1) / 2 * 2;
  const at::Tensor w1v = pack_vnni_transposed(w1, F, D);   // (Dp/2, F, 2): B of x @ w1^T
  const at::Tensor w2v = pack_vnni_transposed(w2, D2, F);  // (Fp/2, D2, 2): B of h @ w2^T
  const at::BFloat16* w1v_p = w1v.data_ptr<at::BFloat16>();
  const at::BFloat16* w2v_p = w2v.data_ptr<at::BFloat16>();
  const AccBiases<float> bias(b1, b2);
  const float *b1_p = bias.b1_p, *b2_p = bias.b2_p;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* saved_p = saved != nullptr ? saved->data_ptr<scalar_t>() : nullptr;
  const BoundEpilogues<scalar_t, float> ep(act, dropout_p, seed, F);
  const int64_t ntiles = (T + kFwdTile - 1) / kFwdTile;

  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hbuf(static_cast<size_t>(kFwdTile * F));
    std::vector<at::BFloat16> hb(static_cast<size_t>(kFwdTile * Fp));
    std::vector<float> keep(ep.keep_size());
    std::vector<at::BFloat16> xpad(Dp != D ? static_cast<size_t>(kFwdTile * Dp) : 0);
    std::vector<float> obuf(static_cast<size_t>(kFwdTile * D2));
    std::vector<scalar_t> prebuf(saved_p == nullptr ? static_cast<size_t>(kFwdTile * F) : 0);
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kFwdTile;
      const int64_t rows = std::min(kFwdTile, T - t0);
      const at::BFloat16* xa = x_p + t0 * D;
      if (Dp != D) {
        for (int64_t r = 0; r < rows; ++r) {
          std::copy(x_p + (t0 + r) * D, x_p + (t0 + r + 1) * D, xpad.data() + r * Dp);
          xpad[r * Dp + D] = at::BFloat16(0.f);
        }
        xa = xpad.data();
      }
      at::native::cpublas::brgemm(rows, F, Dp, Dp, F, F, false, xa, w1v_p, hbuf.data(), true);
      // the pre-activation is rounded to bf16 whether saved or not (as eager bf16 does), so the
      // output does not depend on save_for_backward
      ep.fwd(rows, t0, hbuf.data(), b1_p, saved_p != nullptr ? saved_p + t0 * F : prebuf.data(), keep.data());
      round_rows_bf16(rows, F, Fp, hbuf.data(), hb.data());
      float* o = obuf.data();
      if (b2_p != nullptr) {
        for (int64_t r = 0; r < rows; ++r) std::copy(b2_p, b2_p + D2, o + r * D2);
      }
      at::native::cpublas::brgemm(rows, D2, Fp, Fp, D2, D2, b2_p != nullptr, hb.data(), w2v_p, o, true);
      for (int64_t i = 0; i < rows * D2; ++i) out_p[t0 * D2 + i] = static_cast<scalar_t>(o[i]);
    }
    at::native::cpublas::brgemm_release();
  });
}
#endif

int64_t amx_fwd_calls() { return g_amx_fwd_calls.load(); }
bool amx_available() { return amx_enabled(); }

#include "cpu/ffn_bf16dot.h"  // bf16 on AVX512_BF16 without AMX

std::tuple<at::Tensor, at::Tensor> ffn_fwd_cpu(const at::Tensor& x, const at::Tensor& w1,
                                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                               const std::optional<at::Tensor>& b2, c10::string_view activation,
                                               double dropout_p, const std::optional<at::Tensor>& seed,
                                               bool save_for_backward) {
  const FfnShape s = check_ffn_args(x, w1, b1, w2, b2, activation, dropout_p, seed, cpu_serves());
  const Act act = to_act(s.act);
  const uint64_t seed_v = dropout_p > 0.0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  at::Tensor out = at::empty({s.T, s.D2}, x.options());
  at::Tensor saved = save_for_backward ? at::empty({s.T, s.F}, x.options()) : at::empty({0}, x.options());
  at::Tensor* saved_ptr = save_for_backward ? &saved : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat:
      ffn_fwd_kernel<float, float>(x, w1, b1, w2, b2, act, dropout_p, seed_v, s, out, saved_ptr);
      break;
    case at::kBFloat16:
#if defined(FASTATTN_AMX_BUILD)
      if (s.T > 0 && s.D > 0 && s.F > 0 && s.D2 > 0 && amx_enabled()) {
        ffn_fwd_amx(x, w1, b1, w2, b2, act, dropout_p, seed_v, s, out, saved_ptr);
        g_amx_fwd_calls.fetch_add(1);
        break;
      }
      if (s.T > 0 && s.D > 0 && s.F > 0 && s.D2 > 0 && bf16dot::enabled() && bf16dot_brgemm_ok()) {
        ffn_fwd_amx(x, w1, b1, w2, b2, act, dropout_p, seed_v, s, out, saved_ptr);  // brgemm on vdpbf16ps
        bf16dot::count_ffn_fwd();
        break;
      }
#endif
#if defined(FASTATTN_FFN_BF16DOT)
      if (s.T > 0 && s.D > 0 && s.F > 0 && s.D2 > 0 && bf16dot::enabled()) {
        ffn_fwd_bf16dot(x, w1, b1, w2, b2, act, dropout_p, seed_v, s, out, saved_ptr);
        break;
      }
#endif
      ffn_fwd_kernel<c10::BFloat16, float>(x, w1, b1, w2, b2, act, dropout_p, seed_v, s, out, saved_ptr);
      break;
    default:
      ffn_fwd_kernel<double, double>(x, w1, b1, w2, b2, act, dropout_p, seed_v, s, out, saved_ptr);
      break;
  }
  return {out, saved};
}

// ------------------------------------------------------------------------------------------------
// Backward

// The backward's token loop and weight-gradient reduction, shared by the float kernel and the AMX one.
// Tokens are cut into tiles of kBwdTile rows, the tiles into nchunks chunks of chunk_tiles tiles, both
// set by the shape alone (at most kBwdMaxChunks chunks; fewer, down to kBwdMinChunks, where their
// partials would pass kBwdPartialBytes; so at most 16 threads share the backward). Each
// chunk accumulates its own (dW1^T, dW2, db1, db2) partial over its tiles in order (the first tile's
// GEMMs overwrite, `Partial::fresh`); the chunks share out among the threads in one parallel region,
// and one pass then sums the partials in chunk order, ((p0 + p1) + p2) + ..., element by element.
// Which thread computes a chunk never changes its bits, so every gradient is bitwise the same
// whatever torch.get_num_threads() is.
constexpr int64_t kBwdMaxChunks = 16, kBwdMinChunks = 4;
constexpr int64_t kBwdPartialBytes = int64_t(256) << 20;

template <typename acc_t>
struct BwdTiles {
  struct Partial {
    acc_t* dw1t;  // (D, F)
    acc_t* dw2;   // (D2, F)
    acc_t* db1;   // (F,), zeroed
    acc_t* db2;   // (D2,), zeroed
    bool fresh;   // dw1t and dw2 hold no sum yet: the tile's GEMMs write instead of adding
  };
  int64_t T, D, F, D2, ntiles, psize, chunk_tiles, nchunks;
  at::Tensor part;  // (max(nchunks, 1), psize): [dW1^T (D, F) | dW2 (D2, F) | db1 (F) | db2 (D2)], sum in row 0

  explicit BwdTiles(const FfnShape& s)
      : T(s.T),
        D(s.D),
        F(s.F),
        D2(s.D2),
        ntiles((s.T + kBwdTile - 1) / kBwdTile),
        psize(s.D * s.F + s.D2 * s.F + s.F + s.D2) {
    const int64_t fit = kBwdPartialBytes / std::max<int64_t>(1, psize * static_cast<int64_t>(sizeof(acc_t)));
    const int64_t want = std::max<int64_t>(1, std::min({ntiles, kBwdMaxChunks, std::max(kBwdMinChunks, fit)}));
    chunk_tiles = (ntiles + want - 1) / want;
    nchunks = chunk_tiles > 0 ? (ntiles + chunk_tiles - 1) / chunk_tiles : 0;
    const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
    part = at::empty({std::max<int64_t>(nchunks, 1), psize}, opt);
    if (nchunks == 0) part.zero_();
  }

  // Runs tile(scratch, t0, rows, partial) for every tile; each thread makes its scratch once with
  // make_scratch(). release_brgemm: release brgemm's AMX state on each thread at the end.
  template <typename MakeScratch, typename Tile>
  void run(MakeScratch make_scratch, Tile tile, bool release_brgemm) {
    acc_t* part_p = part.data_ptr<acc_t>();
    // one region, the range padded as parallel_each pads it (at::mm fallback single-threaded)
    at::parallel_for(0, std::max<int64_t>(nchunks, 2), 1, [&](int64_t cbegin, int64_t cend) {
      cend = std::min(cend, nchunks);
      if (cbegin >= cend) return;
      auto sc = make_scratch();
      for (int64_t c = cbegin; c < cend; ++c) {
        acc_t* base = part_p + c * psize;
        Partial pt{base, base + D * F, base + (D + D2) * F, base + (D + D2) * F + F, true};
        std::fill(pt.db1, pt.db1 + F + D2, acc_t(0));
        for (int64_t t = c * chunk_tiles; t < std::min(ntiles, (c + 1) * chunk_tiles); ++t) {
          const int64_t t0 = t * kBwdTile;
          tile(sc, t0, std::min(kBwdTile, T - t0), pt);
          pt.fresh = false;
        }
      }
#if defined(FASTATTN_AMX_BUILD)
      if (release_brgemm) at::native::cpublas::brgemm_release();
#else
      (void)release_brgemm;
#endif
    });
    // row 0 += row 1, += row 2, ... in chunk order, element by element, in blocks across threads
    constexpr int64_t kBlock = 2048;
    at::parallel_for(0, nchunks > 1 ? (psize + kBlock - 1) / kBlock : 0, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t e0 = b0 * kBlock; e0 < std::min(psize, b1 * kBlock); e0 += kBlock) {
        const int64_t e1 = std::min(psize, e0 + kBlock);
        for (int64_t c = 1; c < nchunks; ++c) {
          const acc_t* src = part_p + c * psize;
          for (int64_t e = e0; e < e1; ++e) part_p[e] += src[e];
        }
      }
    });
  }

  // The sums into the outputs (dW1 laid out as (F, D)).
  void finish(at::Tensor& dw1_out, at::Tensor& dw2_out, at::Tensor& db1_out, at::Tensor& db2_out) {
    const at::Tensor acc = part[0];
    dw1_out.copy_(acc.narrow(0, 0, D * F).view({D, F}).t());
    dw2_out.copy_(acc.narrow(0, D * F, D2 * F).view({D2, F}));
    db1_out.copy_(acc.narrow(0, (D + D2) * F, F));
    db2_out.copy_(acc.narrow(0, (D + D2) * F + F, D2));
  }
};

template <typename scalar_t, typename acc_t>
void ffn_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                    const at::Tensor& saved, Act act, double dropout_p, uint64_t seed, const FfnShape& s,
                    at::Tensor& dx, at::Tensor& dw1, at::Tensor& db1, at::Tensor& dw2, at::Tensor& db2) {
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const int64_t D = s.D, F = s.F, D2 = s.D2;
  const at::Tensor w1a = as_acc<acc_t>(w1, false);  // (F, D)
  const at::Tensor w2a = as_acc<acc_t>(w2, false);  // (D2, F)
  const acc_t* w1_p = w1a.data_ptr<acc_t>();
  const acc_t* w2_p = w2a.data_ptr<acc_t>();
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const scalar_t* go_p = grad_out.data_ptr<scalar_t>();
  const scalar_t* pre_p = saved.data_ptr<scalar_t>();
  scalar_t* dx_p = dx.data_ptr<scalar_t>();
  const BoundEpilogues<scalar_t, acc_t> ep(act, dropout_p, seed, F);
  const bool use_brgemm = brgemm_usable();
  struct Scratch {
    std::vector<acc_t> dh, hid, keep, go_t, x_t, go_buf, dx_buf;
  };
  BwdTiles<acc_t> tiles(s);
  tiles.run(
      [&] {
        Scratch sc;
        sc.dh.resize(kBwdTile * F);   // dh, then d pre
        sc.hid.resize(kBwdTile * F);  // act(pre) * keep
        sc.keep.resize(ep.keep_size());
        sc.go_t.resize(D2 * kBwdTile);  // grad_out tile transposed (D2, rows)
        sc.x_t.resize(D * kBwdTile);    // x tile transposed (D, rows)
        sc.go_buf.resize(kSame ? 0 : kBwdTile * D2);
        sc.dx_buf.resize(kSame ? 0 : kBwdTile * D);
        return sc;
      },
      [&](Scratch& sc, int64_t t0, int64_t rows, const typename BwdTiles<acc_t>::Partial& part) {
        const acc_t* go;
        if constexpr (kSame) {
          go = go_p + t0 * D2;
        } else {
          for (int64_t i = 0; i < rows * D2; ++i) sc.go_buf[i] = static_cast<acc_t>(go_p[t0 * D2 + i]);
          go = sc.go_buf.data();
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < D2; ++j) {
            sc.go_t[j * rows + r] = go[r * D2 + j];
            part.db2[j] += go[r * D2 + j];
          }
          const scalar_t* xr = x_p + (t0 + r) * D;
          for (int64_t j = 0; j < D; ++j) sc.x_t[j * rows + r] = static_cast<acc_t>(xr[j]);
        }
        // dh (rows, F) = grad_out_tile (rows, D2) @ w2 (D2, F)
        gemm<acc_t>(rows, F, D2, go, D2, w2_p, F, sc.dh.data(), F, false, use_brgemm);
        ep.bwd(rows, t0, sc.dh.data(), pre_p + t0 * F, sc.hid.data(), part.db1, sc.keep.data());
        // dW2 (D2, F) += grad_out_tile^T (D2, rows) @ hid (rows, F)
        gemm<acc_t>(D2, F, rows, sc.go_t.data(), rows, sc.hid.data(), F, part.dw2, F, !part.fresh, use_brgemm);
        // dW1^T (D, F) += x_tile^T (D, rows) @ dpre (rows, F)
        gemm<acc_t>(D, F, rows, sc.x_t.data(), rows, sc.dh.data(), F, part.dw1t, F, !part.fresh, use_brgemm);
        // dx_tile (rows, D) = dpre (rows, F) @ w1 (F, D)
        if constexpr (kSame) {
          gemm<acc_t>(rows, D, F, sc.dh.data(), F, w1_p, D, dx_p + t0 * D, D, false, use_brgemm);
        } else {
          gemm<acc_t>(rows, D, F, sc.dh.data(), F, w1_p, D, sc.dx_buf.data(), D, false, use_brgemm);
          for (int64_t i = 0; i < rows * D; ++i) dx_p[t0 * D + i] = static_cast<scalar_t>(sc.dx_buf[i]);
        }
      },
      false);
  tiles.finish(dw1, dw2, db1, db2);
}

#if defined(FASTATTN_AMX_BUILD)
std::atomic<int64_t> g_amx_bwd_calls{0};

// (K, N) row-major source (float or bf16, leading dim ld) as VNNI (Kp/2, N, 2) bf16 into dst.
template <typename T>
void pack_vnni_rows(const T* src, int64_t K, int64_t N, int64_t ld, at::BFloat16* dst) {
  const int64_t Kp = (K + 1) / 2 * 2;
  for (int64_t k2 = 0; k2 < Kp / 2; ++k2) {
    const T* r0 = src + 2 * k2 * ld;
    const T* r1 = r0 + ld;
    const bool has1 = 2 * k2 + 1 < K;
    at::BFloat16* row = dst + k2 * N * 2;
    for (int64_t n = 0; n < N; ++n) {
      row[2 * n] = at::BFloat16(static_cast<float>(r0[n]));
      row[2 * n + 1] = has1 ? at::BFloat16(static_cast<float>(r1[n])) : at::BFloat16(0.f);
    }
  }
}

// 16 floats rounded to bf16 (nearest even, NaN kept quiet), in the low half of each dword.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512i round16_bf16(const float* q) {
  const __m512 f = _mm512_loadu_ps(q);
  const __m512i v = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(v, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(v, _mm512_set1_epi32(0x7fff)), lsb), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}

// float (K, N) rows as VNNI bf16 (round to nearest even): each dword holds (row 2k, row 2k+1) of a column.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void pack_vnni_rows_f32(
    const float* src, int64_t K, int64_t N, int64_t ld, at::BFloat16* dst) {
  const int64_t Kp = (K + 1) / 2 * 2;
  for (int64_t k2 = 0; k2 < Kp / 2; ++k2) {
    const float* r0 = src + 2 * k2 * ld;
    const float* r1 = r0 + ld;
    const bool has1 = 2 * k2 + 1 < K;
    at::BFloat16* row = dst + k2 * N * 2;
    int64_t n = 0;
    for (; n + 16 <= N; n += 16) {
      __m512i lo = round16_bf16(r0 + n);
      if (has1) lo = _mm512_or_si512(lo, _mm512_slli_epi32(round16_bf16(r1 + n), 16));
      _mm512_storeu_si512(reinterpret_cast<void*>(row + 2 * n), lo);
    }
    for (; n < N; ++n) {
      row[2 * n] = at::BFloat16(r0[n]);
      row[2 * n + 1] = has1 ? at::BFloat16(r1[n]) : at::BFloat16(0.f);
    }
  }
}

void ffn_bwd_amx(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                 const at::Tensor& saved, Act act, double dropout_p, uint64_t seed, const FfnShape& s,
                 at::Tensor& dx, at::Tensor& dw1, at::Tensor& db1, at::Tensor& dw2, at::Tensor& db2) {
  using scalar_t = c10::BFloat16;
  const int64_t D = s.D, F = s.F, D2 = s.D2;
  const int64_t D2p = (D2 + 1) / 2 * 2, Fp = (F + 1) / 2 * 2;
  const at::Tensor w1c = w1.contiguous(), w2c = w2.contiguous();
  at::Tensor w2v = at::empty({D2p / 2, F, 2}, at::TensorOptions().dtype(at::kBFloat16));  // B of go @ w2
  at::Tensor w1v = at::empty({Fp / 2, D, 2}, at::TensorOptions().dtype(at::kBFloat16));   // B of dpre @ w1
  pack_vnni_rows(w2c.data_ptr<scalar_t>(), D2, F, F, w2v.data_ptr<at::BFloat16>());
  pack_vnni_rows(w1c.data_ptr<scalar_t>(), F, D, D, w1v.data_ptr<at::BFloat16>());
  const at::BFloat16* w1v_p = w1v.data_ptr<at::BFloat16>();
  const at::BFloat16* w2v_p = w2v.data_ptr<at::BFloat16>();
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const scalar_t* go_p = grad_out.data_ptr<scalar_t>();
  const scalar_t* pre_p = saved.data_ptr<scalar_t>();
  scalar_t* dx_p = dx.data_ptr<scalar_t>();
  const BoundEpilogues<scalar_t, float> ep(act, dropout_p, seed, F);
  constexpr int64_t kRp = kBwdTile;  // kBwdTile is even
  struct Scratch {
    std::vector<float> dh, hid, keep, dx_buf;
    std::vector<at::BFloat16> go_pad, go_t, x_t, dpre_b, hid_v, dpre_v;
  };
  BwdTiles<float> tiles(s);
  tiles.run(
      [&] {
        Scratch sc;
        sc.dh.resize(kBwdTile * F);
        sc.hid.resize(kBwdTile * F);
        sc.keep.resize(ep.keep_size());
        sc.go_pad.resize(kBwdTile * D2p);
        sc.go_t.resize(D2 * kRp);  // (D2, rows_p)
        sc.x_t.resize(D * kRp);    // (D, rows_p)
        sc.dpre_b.resize(kBwdTile * Fp);
        sc.hid_v.resize(kRp * F);   // VNNI (rows_p/2, F, 2)
        sc.dpre_v.resize(kRp * F);  // VNNI (rows_p/2, F, 2)
        sc.dx_buf.resize(kBwdTile * D);
        return sc;
      },
      [&](Scratch& sc, int64_t t0, int64_t rows, const BwdTiles<float>::Partial& part) {
        const int64_t rp = (rows + 1) / 2 * 2;
        const scalar_t* go = go_p + t0 * D2;
        const scalar_t* xs = x_p + t0 * D;
        std::fill(sc.go_t.begin(), sc.go_t.end(), at::BFloat16(0.f));
        std::fill(sc.x_t.begin(), sc.x_t.end(), at::BFloat16(0.f));
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < D2; ++j) {
            const scalar_t v = go[r * D2 + j];
            sc.go_pad[r * D2p + j] = v;
            sc.go_t[j * rp + r] = v;
            part.db2[j] += static_cast<float>(v);
          }
          if (D2p != D2) sc.go_pad[r * D2p + D2] = at::BFloat16(0.f);
          for (int64_t j = 0; j < D; ++j) sc.x_t[j * rp + r] = xs[r * D + j];
        }
        // dh (rows, F) = grad_out_tile (rows, D2) @ w2 (D2, F)
        at::native::cpublas::brgemm(rows, F, D2p, D2p, F, F, false, sc.go_pad.data(), w2v_p, sc.dh.data(), true);
        ep.bwd(rows, t0, sc.dh.data(), pre_p + t0 * F, sc.hid.data(), part.db1, sc.keep.data());
        pack_vnni_rows_f32(sc.hid.data(), rows, F, F, sc.hid_v.data());
        pack_vnni_rows_f32(sc.dh.data(), rows, F, F, sc.dpre_v.data());
        round_rows_bf16(rows, F, Fp, sc.dh.data(), sc.dpre_b.data());
        // dW2 (D2, F) += grad_out_tile^T (D2, rows) @ hid (rows, F)
        at::native::cpublas::brgemm(D2, F, rp, rp, F, F, !part.fresh, sc.go_t.data(), sc.hid_v.data(), part.dw2,
                                    true);
        // dW1^T (D, F) += x_tile^T (D, rows) @ dpre (rows, F)
        at::native::cpublas::brgemm(D, F, rp, rp, F, F, !part.fresh, sc.x_t.data(), sc.dpre_v.data(), part.dw1t,
                                    true);
        // dx_tile (rows, D) = dpre (rows, F) @ w1 (F, D)
        at::native::cpublas::brgemm(rows, D, Fp, Fp, D, D, false, sc.dpre_b.data(), w1v_p, sc.dx_buf.data(), true);
        for (int64_t i = 0; i < rows * D; ++i) dx_p[t0 * D + i] = static_cast<scalar_t>(sc.dx_buf[i]);
      },
      true);
  tiles.finish(dw1, dw2, db1, db2);
}
int64_t amx_bwd_calls() { return g_amx_bwd_calls.load(); }
#else
int64_t amx_bwd_calls() { return 0; }
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2, const at::Tensor& saved, c10::string_view activation,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  const FfnShape s = check_ffn_args(x, w1, b1, w2, b2, activation, dropout_p, seed, cpu_serves());
  check_ffn_bwd_args(grad_out, saved, x, s);
  const Act act = to_act(s.act);
  const uint64_t seed_v = dropout_p > 0.0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor pre = saved.contiguous();
  at::Tensor dx = at::empty({s.T, s.D}, x.options());
  at::Tensor dw1 = at::empty({s.F, s.D}, x.options());
  at::Tensor db1 = at::empty({s.F}, x.options());
  at::Tensor dw2 = at::empty({s.D2, s.F}, x.options());
  at::Tensor db2 = at::empty({s.D2}, x.options());
  switch (x.scalar_type()) {
    case at::kFloat:
      ffn_bwd_kernel<float, float>(go, x, w1, w2, pre, act, dropout_p, seed_v, s, dx, dw1, db1, dw2, db2);
      break;
    case at::kBFloat16:
#if defined(FASTATTN_AMX_BUILD)
      if (s.T > 0 && s.D > 0 && s.F > 0 && s.D2 > 0 && amx_enabled()) {
        ffn_bwd_amx(go, x, w1, w2, pre, act, dropout_p, seed_v, s, dx, dw1, db1, dw2, db2);
        g_amx_bwd_calls.fetch_add(1);
        break;
      }
      if (s.T > 0 && s.D > 0 && s.F > 0 && s.D2 > 0 && bf16dot::enabled() && bf16dot_brgemm_ok()) {
        ffn_bwd_amx(go, x, w1, w2, pre, act, dropout_p, seed_v, s, dx, dw1, db1, dw2, db2);  // on vdpbf16ps
        bf16dot::count_ffn_bwd();
        break;
      }
#endif
#if defined(FASTATTN_FFN_BF16DOT)
      if (s.T > 0 && s.D > 0 && s.F > 0 && s.D2 > 0 && bf16dot::enabled()) {
        ffn_bwd_bf16dot(go, x, w1, w2, pre, act, dropout_p, seed_v, s, dx, dw1, db1, dw2, db2);
        break;
      }
#endif
      ffn_bwd_kernel<c10::BFloat16, float>(go, x, w1, w2, pre, act, dropout_p, seed_v, s, dx, dw1, db1, dw2, db2);
      break;
    default:
      ffn_bwd_kernel<double, double>(go, x, w1, w2, pre, act, dropout_p, seed_v, s, dx, dw1, db1, dw2, db2);
      break;
  }
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace fastattn::ffn

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("ffn_fwd", &fastattn::ffn::ffn_fwd_cpu);
  m.impl("ffn_bwd", &fastattn::ffn::ffn_bwd_cpu);
}

// Introspection for the tests: whether the bf16 AMX path can run here (and is not turned off by
// FASTATTN_FFN_AMX=0), and how many forward calls it served.
TORCH_LIBRARY(fastattn_ffn, m) {
  m.def("amx_available() -> bool", &fastattn::ffn::amx_available);
  m.def("amx_fwd_calls() -> int", &fastattn::ffn::amx_fwd_calls);
  m.def("amx_bwd_calls() -> int", &fastattn::ffn::amx_bwd_calls);
}
