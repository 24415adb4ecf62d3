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
//             Weight gradients accumulate in one partial per thread group (groups are fixed
//             contiguous token ranges, tiles in order) and are summed in group order: the result
//             is the same on every call with the same thread count.
// GEMMs: oneDNN's brgemm micro-kernel through at::native::cpublas::brgemm (float; as fast as MKL
// sgemm on these tile shapes here, without at::mm's per-call overhead), else at::mm on tile views
// (double, a torch without float brgemm, or FASTATTN_FFN_NO_BRGEMM=1). at::native::cpublas::gemm
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

#include "cpu/ffn_math.h"
#include "cpu/bf16dot.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define FASTATTN_FFN_AMX_BUILD 1
#endif

namespace fastattn::ffn {
namespace {

constexpr int64_t kFwdTile = 64;  // tokens per forward tile: (64, F) fp32 hidden stays in L2
constexpr int64_t kBwdTile = 64;  // tokens per backward tile (two (64, F) fp32 buffers)

// ------------------------------------------------------------------------------------------------
// GEMM: C (M, N) [+]= A (M, K) @ B (K, N), all row-major with leading dimensions, single-threaded
// when called inside at::parallel_for.

bool brgemm_usable() {
  static const bool ok = [] {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
    const char* env = std::getenv("FASTATTN_FFN_NO_BRGEMM");
    if (env != nullptr && env[0] == '1') return false;
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

template <typename scalar_t, typename acc_t, Act A, bool DROP>
FwdEpilogueFn<scalar_t, acc_t> pick_fwd_isa() {
#if defined(FFN_HAVE_X86_DISPATCH)
  switch (detect_isa()) {
    case Isa::Avx512: return &fwd_epilogue_avx512<scalar_t, acc_t, A, DROP>;
    case Isa::Avx2: return &fwd_epilogue_avx2<scalar_t, acc_t, A, DROP>;
    default: break;
  }
#endif
  return &fwd_epilogue_base<scalar_t, acc_t, A, DROP>;
}

template <typename scalar_t, typename acc_t, Act A, bool DROP>
BwdEpilogueFn<scalar_t, acc_t> pick_bwd_isa() {
#if defined(FFN_HAVE_X86_DISPATCH)
  switch (detect_isa()) {
    case Isa::Avx512: return &bwd_epilogue_avx512<scalar_t, acc_t, A, DROP>;
    case Isa::Avx2: return &bwd_epilogue_avx2<scalar_t, acc_t, A, DROP>;
    default: break;
  }
#endif
  return &bwd_epilogue_base<scalar_t, acc_t, A, DROP>;
}

template <typename scalar_t, typename acc_t, bool DROP>
FwdEpilogueFn<scalar_t, acc_t> pick_fwd_act(Act a) {
  switch (a) {
    case Act::Relu: return pick_fwd_isa<scalar_t, acc_t, Act::Relu, DROP>();
    case Act::Gelu: return pick_fwd_isa<scalar_t, acc_t, Act::Gelu, DROP>();
    default: return pick_fwd_isa<scalar_t, acc_t, Act::GeluTanh, DROP>();
  }
}

template <typename scalar_t, typename acc_t>
FwdEpilogueFn<scalar_t, acc_t> pick_fwd(Act a, bool drop) {
  return drop ? pick_fwd_act<scalar_t, acc_t, true>(a) : pick_fwd_act<scalar_t, acc_t, false>(a);
}

template <typename scalar_t, typename acc_t, bool DROP>
BwdEpilogueFn<scalar_t, acc_t> pick_bwd_act(Act a) {
  switch (a) {
    case Act::Relu: return pick_bwd_isa<scalar_t, acc_t, Act::Relu, DROP>();
    case Act::Gelu: return pick_bwd_isa<scalar_t, acc_t, Act::Gelu, DROP>();
    default: return pick_bwd_isa<scalar_t, acc_t, Act::GeluTanh, DROP>();
  }
}

template <typename scalar_t, typename acc_t>
BwdEpilogueFn<scalar_t, acc_t> pick_bwd(Act a, bool drop) {
  return drop ? pick_bwd_act<scalar_t, acc_t, true>(a) : pick_bwd_act<scalar_t, acc_t, false>(a);
}

// ------------------------------------------------------------------------------------------------
// Argument checks (every message names the argument, what it got and what was expected).

Act parse_activation(c10::string_view activation) {
  if (activation == "relu") return Act::Relu;
  if (activation == "gelu") return Act::Gelu;
  if (activation == "gelu_tanh") return Act::GeluTanh;
  TORCH_CHECK(false, "fastattn ffn (cpu): activation must be \"relu\", \"gelu\" or \"gelu_tanh\", got \"",
              std::string(activation), "\"");
}

struct FfnShape {
  int64_t T, D, F, D2;
};

FfnShape check_ffn_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                        const at::Tensor& w2, const std::optional<at::Tensor>& b2, double dropout_p,
                        const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.device().is_cpu(), "fastattn ffn (cpu): x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "fastattn ffn (cpu): x must be 2-D (T, D), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "fastattn ffn (cpu): x must be contiguous, got strides ", x.strides());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kDouble,
              "fastattn ffn (cpu): x dtype must be float32, bfloat16 or float64, got ", dt);
  const int64_t T = x.size(0), D = x.size(1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == D, "fastattn ffn (cpu): w1 must have shape (F, D) with D = ", D,
              " (x's last dim), got ", w1.sizes());
  const int64_t F = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == F, "fastattn ffn (cpu): w2 must have shape (D2, F) with F = ", F,
              " (w1's rows), got ", w2.sizes());
  const int64_t D2 = w2.size(0);
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "fastattn ffn (cpu): ", name, " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.scalar_type() == dt, "fastattn ffn (cpu): ", name, " dtype must equal x's (", dt, "), got ",
                t.scalar_type());
  };
  same(w1, "w1");
  same(w2, "w2");
  if (b1.has_value()) {
    same(*b1, "b1");
    TORCH_CHECK(b1->dim() == 1 && b1->size(0) == F, "fastattn ffn (cpu): b1 must have shape (", F, ",), got ",
                b1->sizes());
  }
  if (b2.has_value()) {
    same(*b2, "b2");
    TORCH_CHECK(b2->dim() == 1 && b2->size(0) == D2, "fastattn ffn (cpu): b2 must have shape (", D2, ",), got ",
                b2->sizes());
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn ffn (cpu): dropout_p must be in [0, 1), got ",
              dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), "fastattn ffn (cpu): seed must be given when dropout_p > 0 (got None)");
    TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() == 1,
                "fastattn ffn (cpu): seed must be an int64 CPU tensor of shape (1,), got ", seed->scalar_type(),
                " on ", seed->device(), " with shape ", seed->sizes());
  }
  return {T, D, F, D2};
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
  const at::Tensor b1a = b1.has_value() ? b1->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
  const at::Tensor b2a = b2.has_value() ? b2->to(c10::CppTypeToScalarType<acc_t>::value).contiguous() : at::Tensor();
  const acc_t* w1t_p = w1t.data_ptr<acc_t>();
  const acc_t* w2t_p = w2t.data_ptr<acc_t>();
  const acc_t* b1_p = b1a.defined() ? b1a.data_ptr<acc_t>() : nullptr;
  const acc_t* b2_p = b2a.defined() ? b2a.data_ptr<acc_t>() : nullptr;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* saved_p = saved != nullptr ? saved->data_ptr<scalar_t>() : nullptr;
  const bool drop = dropout_p > 0.0;
  const float p = static_cast<float>(dropout_p);
  const acc_t scale = drop ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1);
  const auto epilogue = pick_fwd<scalar_t, acc_t>(act, drop);
  const bool use_brgemm = brgemm_usable();
  const int64_t ntiles = (T + kFwdTile - 1) / kFwdTile;

  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hbuf(static_cast<size_t>(kFwdTile * F));
    std::vector<acc_t> keep(drop ? static_cast<size_t>(F) : 0);
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
      epilogue(rows, F, hbuf.data(), b1_p, saved_p != nullptr ? saved_p + t0 * F : nullptr, seed,
               static_cast<uint64_t>(t0) * static_cast<uint64_t>(F), p, scale, keep.data());
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
// hidden tile rounded to bf16 for the second GEMM (as eager bf16 does). FASTATTN_FFN_AMX=0 turns it
// off; torch.ops.fastattn_ffn.amx_fwd_calls() counts the calls it served.

std::atomic<int64_t> g_amx_fwd_calls{0};

#if defined(FASTATTN_FFN_AMX_BUILD)
bool amx_hardware_ok() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return false;
    try {
      if (!at::native::cpublas::could_pack(at::kBFloat16)) return false;
      at::BFloat16 a[2] = {at::BFloat16(1.f), at::BFloat16(2.f)};
      at::BFloat16 bm[32];
      for (int n = 0; n < 16; ++n) {
        bm[2 * n] = at::BFloat16(3.f);
        bm[2 * n + 1] = at::BFloat16(4.f);
      }
      float c[16] = {0};
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a, bm, c, true);
      at::native::cpublas::brgemm_release();
      for (int n = 0; n < 16; ++n)
        if (c[n] != 11.f) return false;
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}
#endif

bool amx_enabled() {
#if defined(FASTATTN_FFN_AMX_BUILD)
  const char* env = std::getenv("FASTATTN_FFN_AMX");
  if (env != nullptr && env[0] == '0') return false;
  return amx_hardware_ok();
#else
  return false;
#endif
}

#if defined(FASTATTN_FFN_AMX_BUILD)
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
  const at::Tensor b1a = b1.has_value() ? b1->to(at::kFloat).contiguous() : at::Tensor();
  const at::Tensor b2a = b2.has_value() ? b2->to(at::kFloat).contiguous() : at::Tensor();
  const at::BFloat16* w1v_p = w1v.data_ptr<at::BFloat16>();
  const at::BFloat16* w2v_p = w2v.data_ptr<at::BFloat16>();
  const float* b1_p = b1a.defined() ? b1a.data_ptr<float>() : nullptr;
  const float* b2_p = b2a.defined() ? b2a.data_ptr<float>() : nullptr;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  scalar_t* out_p = out.data_ptr<scalar_t>();
  scalar_t* saved_p = saved != nullptr ? saved->data_ptr<scalar_t>() : nullptr;
  const bool drop = dropout_p > 0.0;
  const float p = static_cast<float>(dropout_p);
  const float scale = drop ? float(1.0 / (1.0 - dropout_p)) : 1.f;
  const auto epilogue = pick_fwd<scalar_t, float>(act, drop);
  const int64_t ntiles = (T + kFwdTile - 1) / kFwdTile;

  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hbuf(static_cast<size_t>(kFwdTile * F));
    std::vector<at::BFloat16> hb(static_cast<size_t>(kFwdTile * Fp));
    std::vector<float> keep(drop ? static_cast<size_t>(F) : 0);
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
      epilogue(rows, F, hbuf.data(), b1_p, saved_p != nullptr ? saved_p + t0 * F : prebuf.data(), seed,
               static_cast<uint64_t>(t0) * static_cast<uint64_t>(F), p, scale, keep.data());
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
  const Act act = parse_activation(activation);
  const FfnShape s = check_ffn_args(x, w1, b1, w2, b2, dropout_p, seed);
  const uint64_t seed_v = dropout_p > 0.0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  at::Tensor out = at::empty({s.T, s.D2}, x.options());
  at::Tensor saved = save_for_backward ? at::empty({s.T, s.F}, x.options()) : at::empty({0}, x.options());
  at::Tensor* saved_ptr = save_for_backward ? &saved : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat:
      ffn_fwd_kernel<float, float>(x, w1, b1, w2, b2, act, dropout_p, seed_v, s, out, saved_ptr);
      break;
    case at::kBFloat16:
#if defined(FASTATTN_FFN_AMX_BUILD)
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

template <typename scalar_t, typename acc_t>
void ffn_bwd_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                    const at::Tensor& saved, Act act, double dropout_p, uint64_t seed, const FfnShape& s,
                    at::Tensor& dx, at::Tensor& dw1, at::Tensor& db1, at::Tensor& dw2, at::Tensor& db2) {
  constexpr bool kSame = std::is_same_v<scalar_t, acc_t>;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t T = s.T, D = s.D, F = s.F, D2 = s.D2;
  const at::Tensor w1a = as_acc<acc_t>(w1, false);  // (F, D)
  const at::Tensor w2a = as_acc<acc_t>(w2, false);  // (D2, F)
  const acc_t* w1_p = w1a.data_ptr<acc_t>();
  const acc_t* w2_p = w2a.data_ptr<acc_t>();
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const scalar_t* go_p = grad_out.data_ptr<scalar_t>();
  const scalar_t* pre_p = saved.data_ptr<scalar_t>();
  scalar_t* dx_p = dx.data_ptr<scalar_t>();
  const bool drop = dropout_p > 0.0;
  const float p = static_cast<float>(dropout_p);
  const acc_t scale = drop ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(1);
  const auto epilogue = pick_bwd<scalar_t, acc_t>(act, drop);
  const bool use_brgemm = brgemm_usable();
  const int64_t ntiles = (T + kBwdTile - 1) / kBwdTile;
  // one weight-gradient partial per group of consecutive tiles; groups = threads (<= tiles)
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(ntiles, at::get_num_threads()));
  at::Tensor dw1t_part = at::zeros({groups, D, F}, at::TensorOptions().dtype(acc_type));  // dW1^T partials
  at::Tensor dw2_part = at::zeros({groups, D2, F}, at::TensorOptions().dtype(acc_type));
  at::Tensor db1_part = at::zeros({groups, F}, at::TensorOptions().dtype(acc_type));
  at::Tensor db2_part = at::zeros({groups, D2}, at::TensorOptions().dtype(acc_type));
  acc_t* dw1t_pp = dw1t_part.data_ptr<acc_t>();
  acc_t* dw2_pp = dw2_part.data_ptr<acc_t>();
  acc_t* db1_pp = db1_part.data_ptr<acc_t>();
  acc_t* db2_pp = db2_part.data_ptr<acc_t>();

  at::parallel_for(0, groups, 1, [&](int64_t gbegin, int64_t gend) {
    std::vector<acc_t> dh(static_cast<size_t>(kBwdTile * F));   // dh, then d pre
    std::vector<acc_t> hid(static_cast<size_t>(kBwdTile * F));  // act(pre) * keep
    std::vector<acc_t> keep(drop ? static_cast<size_t>(F) : 0);
    std::vector<acc_t> go_t(static_cast<size_t>(D2 * kBwdTile));  // grad_out tile transposed (D2, rows)
    std::vector<acc_t> x_t(static_cast<size_t>(D * kBwdTile));    // x tile transposed (D, rows)
    std::vector<acc_t> go_buf(kSame ? 0 : static_cast<size_t>(kBwdTile * D2));
    std::vector<acc_t> dx_buf(kSame ? 0 : static_cast<size_t>(kBwdTile * D));
    for (int64_t g = gbegin; g < gend; ++g) {
      acc_t* dw1t_g = dw1t_pp + g * D * F;
      acc_t* dw2_g = dw2_pp + g * D2 * F;
      acc_t* db1_g = db1_pp + g * F;
      acc_t* db2_g = db2_pp + g * D2;
      const int64_t tile_begin = g * ntiles / groups, tile_end = (g + 1) * ntiles / groups;
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t t0 = tile * kBwdTile;
        const int64_t rows = std::min(kBwdTile, T - t0);
        const acc_t* go;
        if constexpr (kSame) {
          go = go_p + t0 * D2;
        } else {
          for (int64_t i = 0; i < rows * D2; ++i) go_buf[i] = static_cast<acc_t>(go_p[t0 * D2 + i]);
          go = go_buf.data();
        }
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < D2; ++j) {
            go_t[j * rows + r] = go[r * D2 + j];
            db2_g[j] += go[r * D2 + j];
          }
          const scalar_t* xr = x_p + (t0 + r) * D;
          for (int64_t j = 0; j < D; ++j) x_t[j * rows + r] = static_cast<acc_t>(xr[j]);
        }
        // dh (rows, F) = grad_out_tile (rows, D2) @ w2 (D2, F)
        gemm<acc_t>(rows, F, D2, go, D2, w2_p, F, dh.data(), F, false, use_brgemm);
        epilogue(rows, F, dh.data(), pre_p + t0 * F, hid.data(), db1_g, seed,
                 static_cast<uint64_t>(t0) * static_cast<uint64_t>(F), p, scale, keep.data());
        // dW2 (D2, F) += grad_out_tile^T (D2, rows) @ hid (rows, F)
        gemm<acc_t>(D2, F, rows, go_t.data(), rows, hid.data(), F, dw2_g, F, true, use_brgemm);
        // dW1^T (D, F) += x_tile^T (D, rows) @ dpre (rows, F)
        gemm<acc_t>(D, F, rows, x_t.data(), rows, dh.data(), F, dw1t_g, F, true, use_brgemm);
        // dx_tile (rows, D) = dpre (rows, F) @ w1 (F, D)
        if constexpr (kSame) {
          gemm<acc_t>(rows, D, F, dh.data(), F, w1_p, D, dx_p + t0 * D, D, false, use_brgemm);
        } else {
          gemm<acc_t>(rows, D, F, dh.data(), F, w1_p, D, dx_buf.data(), D, false, use_brgemm);
          for (int64_t i = 0; i < rows * D; ++i) dx_p[t0 * D + i] = static_cast<scalar_t>(dx_buf[i]);
        }
      }
    }
  });

  // Sum the partials in group order (fixed), then lay dW1 out as (F, D).
  at::Tensor dw1t = dw1t_part[0];
  at::Tensor dw2a = dw2_part[0];
  at::Tensor db1a = db1_part[0];
  at::Tensor db2a = db2_part[0];
  for (int64_t g = 1; g < groups; ++g) {
    dw1t.add_(dw1t_part[g]);
    dw2a.add_(dw2_part[g]);
    db1a.add_(db1_part[g]);
    db2a.add_(db2_part[g]);
  }
  dw1.copy_(dw1t.t());
  dw2.copy_(dw2a);
  db1.copy_(db1a);
  db2.copy_(db2a);
}

#if defined(FASTATTN_FFN_AMX_BUILD)
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
  const int64_t T = s.T, D = s.D, F = s.F, D2 = s.D2;
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
  const bool drop = dropout_p > 0.0;
  const float p = static_cast<float>(dropout_p);
  const float scale = drop ? float(1.0 / (1.0 - dropout_p)) : 1.f;
  const auto epilogue = pick_bwd<scalar_t, float>(act, drop);
  const int64_t ntiles = (T + kBwdTile - 1) / kBwdTile;
  const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(ntiles, at::get_num_threads()));
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor dw1t_part = at::zeros({groups, D, F}, fopt);
  at::Tensor dw2_part = at::zeros({groups, D2, F}, fopt);
  at::Tensor db1_part = at::zeros({groups, F}, fopt);
  at::Tensor db2_part = at::zeros({groups, D2}, fopt);
  float* dw1t_pp = dw1t_part.data_ptr<float>();
  float* dw2_pp = dw2_part.data_ptr<float>();
  float* db1_pp = db1_part.data_ptr<float>();
  float* db2_pp = db2_part.data_ptr<float>();
  constexpr int64_t kRp = kBwdTile;  // kBwdTile is even

  at::parallel_for(0, groups, 1, [&](int64_t gbegin, int64_t gend) {
    std::vector<float> dh(static_cast<size_t>(kBwdTile * F));
    std::vector<float> hid(static_cast<size_t>(kBwdTile * F));
    std::vector<float> keep(drop ? static_cast<size_t>(F) : 0);
    std::vector<at::BFloat16> go_pad(static_cast<size_t>(kBwdTile * D2p));
    std::vector<at::BFloat16> go_t(static_cast<size_t>(D2 * kRp));  // (D2, rows_p)
    std::vector<at::BFloat16> x_t(static_cast<size_t>(D * kRp));    // (D, rows_p)
    std::vector<at::BFloat16> dpre_b(static_cast<size_t>(kBwdTile * Fp));
    std::vector<at::BFloat16> hid_v(static_cast<size_t>(kRp * F));   // VNNI (rows_p/2, F, 2)
    std::vector<at::BFloat16> dpre_v(static_cast<size_t>(kRp * F));  // VNNI (rows_p/2, F, 2)
    std::vector<float> dx_buf(static_cast<size_t>(kBwdTile * D));
    for (int64_t g = gbegin; g < gend; ++g) {
      float* dw1t_g = dw1t_pp + g * D * F;
      float* dw2_g = dw2_pp + g * D2 * F;
      float* db1_g = db1_pp + g * F;
      float* db2_g = db2_pp + g * D2;
      const int64_t tile_begin = g * ntiles / groups, tile_end = (g + 1) * ntiles / groups;
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t t0 = tile * kBwdTile;
        const int64_t rows = std::min(kBwdTile, T - t0);
        const int64_t rp = (rows + 1) / 2 * 2;
        const scalar_t* go = go_p + t0 * D2;
        const scalar_t* xs = x_p + t0 * D;
        std::fill(go_t.begin(), go_t.end(), at::BFloat16(0.f));
        std::fill(x_t.begin(), x_t.end(), at::BFloat16(0.f));
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < D2; ++j) {
            const scalar_t v = go[r * D2 + j];
            go_pad[r * D2p + j] = v;
            go_t[j * rp + r] = v;
            db2_g[j] += static_cast<float>(v);
          }
          if (D2p != D2) go_pad[r * D2p + D2] = at::BFloat16(0.f);
          for (int64_t j = 0; j < D; ++j) x_t[j * rp + r] = xs[r * D + j];
        }
        // dh (rows, F) = grad_out_tile (rows, D2) @ w2 (D2, F)
        at::native::cpublas::brgemm(rows, F, D2p, D2p, F, F, false, go_pad.data(), w2v_p, dh.data(), true);
        epilogue(rows, F, dh.data(), pre_p + t0 * F, hid.data(), db1_g, seed,
                 static_cast<uint64_t>(t0) * static_cast<uint64_t>(F), p, scale, keep.data());
        pack_vnni_rows_f32(hid.data(), rows, F, F, hid_v.data());
        pack_vnni_rows_f32(dh.data(), rows, F, F, dpre_v.data());
        round_rows_bf16(rows, F, Fp, dh.data(), dpre_b.data());
        // dW2 (D2, F) += grad_out_tile^T (D2, rows) @ hid (rows, F)
        at::native::cpublas::brgemm(D2, F, rp, rp, F, F, true, go_t.data(), hid_v.data(), dw2_g, true);
        // dW1^T (D, F) += x_tile^T (D, rows) @ dpre (rows, F)
        at::native::cpublas::brgemm(D, F, rp, rp, F, F, true, x_t.data(), dpre_v.data(), dw1t_g, true);
        // dx_tile (rows, D) = dpre (rows, F) @ w1 (F, D)
        at::native::cpublas::brgemm(rows, D, Fp, Fp, D, D, false, dpre_b.data(), w1v_p, dx_buf.data(), true);
        for (int64_t i = 0; i < rows * D; ++i) dx_p[t0 * D + i] = static_cast<scalar_t>(dx_buf[i]);
      }
    }
    at::native::cpublas::brgemm_release();
  });

  at::Tensor dw1t = dw1t_part[0];
  at::Tensor dw2a = dw2_part[0];
  at::Tensor db1a = db1_part[0];
  at::Tensor db2a = db2_part[0];
  for (int64_t g = 1; g < groups; ++g) {
    dw1t.add_(dw1t_part[g]);
    dw2a.add_(dw2_part[g]);
    db1a.add_(db1_part[g]);
    db2a.add_(db2_part[g]);
  }
  dw1.copy_(dw1t.t());
  dw2.copy_(dw2a);
  db1.copy_(db1a);
  db2.copy_(db2a);
}
int64_t amx_bwd_calls() { return g_amx_bwd_calls.load(); }
#else
int64_t amx_bwd_calls() { return 0; }
#endif

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ffn_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2, const at::Tensor& saved, c10::string_view activation,
    double dropout_p, const std::optional<at::Tensor>& seed) {
  const Act act = parse_activation(activation);
  const FfnShape s = check_ffn_args(x, w1, b1, w2, b2, dropout_p, seed);
  TORCH_CHECK(grad_out.device().is_cpu() && grad_out.scalar_type() == x.scalar_type(),
              "fastattn ffn_bwd (cpu): grad_out must be a CPU tensor of x's dtype (", x.scalar_type(), "), got ",
              grad_out.scalar_type(), " on ", grad_out.device());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == s.T && grad_out.size(1) == s.D2,
              "fastattn ffn_bwd (cpu): grad_out must have shape (", s.T, ", ", s.D2, "), got ", grad_out.sizes());
  TORCH_CHECK(saved.device().is_cpu() && saved.scalar_type() == x.scalar_type(),
              "fastattn ffn_bwd (cpu): saved must be a CPU tensor of x's dtype (", x.scalar_type(), "), got ",
              saved.scalar_type(), " on ", saved.device());
  TORCH_CHECK(saved.dim() == 2 && saved.size(0) == s.T && saved.size(1) == s.F,
              "fastattn ffn_bwd (cpu): saved (the pre-activation from ffn_fwd with save_for_backward=True) must "
              "have shape (", s.T, ", ", s.F, "), got ", saved.sizes());
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
#if defined(FASTATTN_FFN_AMX_BUILD)
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
