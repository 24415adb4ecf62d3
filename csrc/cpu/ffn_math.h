// Element-wise math of the CPU feed-forward kernels (csrc/cpu/feed_forward.cpp): activations,
// their derivatives and the dropout keep/scale row, written as plain loops over one hidden row so
// that the compiler vectorises them. feed_forward.cpp instantiates them inside functions compiled
// for AVX-512 / AVX2 (chosen at run time), so no -march flag is needed.
//
// float uses polynomial exp/erf (abs error ~1e-7, well inside fp32 GEMM rounding); double calls
// the exact std:: functions.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "philox.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FFN_X86_AVX512_PHILOX 1
#endif

#if defined(__GNUC__)
#define FFN_INLINE inline __attribute__((always_inline))
#else
#define FFN_INLINE inline
#endif

namespace fastattn::ffn {

enum class Act { Relu, Gelu, GeluTanh };

constexpr double kSqrtHalf = 0.70710678118654752440;   // 1/sqrt(2)
constexpr double kInvSqrt2Pi = 0.39894228040143267794;  // 1/sqrt(2*pi)
constexpr double kSqrt2OverPi = 0.79788456080286535588; // sqrt(2/pi)
constexpr double kTanhCoef = 0.044715;

// ---- exp(x) for x <= 0 (all the callers need), float: range reduction + degree-7 polynomial ----
FFN_INLINE float exp_nonpos(float x) {
  // clamp to [-87, 0] on the bit pattern: for x <= 0, a larger magnitude is a larger signed int.
  // (A float compare-and-select here, next to the int conversion, keeps GCC from vectorising.)
  int32_t xi;
  __builtin_memcpy(&xi, &x, sizeof(float));
  constexpr int32_t kMinBits = static_cast<int32_t>(0xC2AE0000u);  // -87.0f
  xi = xi > kMinBits ? kMinBits : xi;
  __builtin_memcpy(&x, &xi, sizeof(float));
  // n = round(x / ln2) (x <= 0: truncating y - 0.5 rounds to nearest)
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
  float r = x - n * 0.693145751953125f;  // ln2 split in two for an exact product
  r = r - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  __builtin_memcpy(&two_n, &e, sizeof(float));
  return p * two_n;
}
FFN_INLINE double exp_nonpos(double x) { return std::exp(x); }

// ---- erf: float by Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7); double exact ----
FFN_INLINE float erf_approx(float x) {
  const float ax = __builtin_fabsf(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float y = 1.061405429f;
  y = y * t - 1.453152027f;
  y = y * t + 1.421413741f;
  y = y * t - 0.284496736f;
  y = y * t + 0.254829592f;
  y = 1.0f - y * t * exp_nonpos(-ax * ax);
  return x < 0.0f ? -y : y;
}
FFN_INLINE double erf_approx(double x) { return std::erf(x); }

// ---- tanh through exp(-2|u|) (no overflow); float keeps absolute error ~1e-7 ----
FFN_INLINE float tanh_approx(float u) {
  const float e = exp_nonpos(-2.0f * __builtin_fabsf(u));
  const float t = (1.0f - e) / (1.0f + e);
  return u < 0.0f ? -t : t;
}
FFN_INLINE double tanh_approx(double u) { return std::tanh(u); }

template <Act A, typename acc_t>
FFN_INLINE acc_t act_value(acc_t p) {
  if constexpr (A == Act::Relu) {
    return p <= acc_t(0) ? acc_t(0) : p;  // NaN stays NaN, as torch.relu
  } else if constexpr (A == Act::Gelu) {
    return acc_t(0.5) * p * (acc_t(1) + erf_approx(p * acc_t(kSqrtHalf)));
  } else {
    const acc_t u = acc_t(kSqrt2OverPi) * (p + acc_t(kTanhCoef) * p * p * p);
    return acc_t(0.5) * p * (acc_t(1) + tanh_approx(u));
  }
}

// value and derivative d act / d p at once (shares the transcendental work)
template <Act A, typename acc_t>
FFN_INLINE void act_value_grad(acc_t p, acc_t& value, acc_t& grad) {
  if constexpr (A == Act::Relu) {
    const bool off = p <= acc_t(0);  // NaN: value NaN, gradient passed (torch's threshold_backward)
    value = off ? acc_t(0) : p;
    grad = off ? acc_t(0) : acc_t(1);
  } else if constexpr (A == Act::Gelu) {
    const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_approx(p * acc_t(kSqrtHalf)));
    const acc_t pdf = acc_t(kInvSqrt2Pi) * exp_nonpos(acc_t(-0.5) * p * p);
    value = p * cdf;
    grad = cdf + p * pdf;
  } else {
    const acc_t p2 = p * p;
    const acc_t u = acc_t(kSqrt2OverPi) * (p + acc_t(kTanhCoef) * p2 * p);
    const acc_t th = tanh_approx(u);
    const acc_t du = acc_t(kSqrt2OverPi) * (acc_t(1) + acc_t(3.0 * kTanhCoef) * p2);
    value = acc_t(0.5) * p * (acc_t(1) + th);
    grad = acc_t(0.5) * (acc_t(1) + th) + acc_t(0.5) * p * (acc_t(1) - th * th) * du;
  }
}

// bfloat16 <-> float written out here (always inlined) so that the loops that use them vectorise
// inside the per-ISA functions; same rounding as c10::BFloat16 (nearest even, NaN kept NaN).
FFN_INLINE float load_acc(float v, float) { return v; }
FFN_INLINE double load_acc(double v, double) { return v; }
FFN_INLINE float load_acc(c10::BFloat16 v, float) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(float));
  return f;
}
FFN_INLINE void store_as(float v, float* dst) { *dst = v; }
FFN_INLINE void store_as(double v, double* dst) { *dst = v; }
FFN_INLINE void store_as(float v, c10::BFloat16* dst) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, sizeof(float));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  dst->x = static_cast<uint16_t>(nan ? 0x7FC0u : rounded);
}

// keep[f] = scale if philox_uniform(seed, off0 + f) >= p else 0, for f in [0, n)
template <typename acc_t>
FFN_INLINE void dropout_row(uint64_t seed, uint64_t off0, int64_t n, float p, acc_t scale, acc_t* __restrict__ keep) {
  for (int64_t f = 0; f < n; ++f) {
    const float u = philox_uniform(seed, off0 + static_cast<uint64_t>(f));
    keep[f] = u >= p ? scale : acc_t(0);
  }
}

#if defined(FFN_X86_AVX512_PHILOX)
#define FFN_AVX512_TARGET __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
// high 32 bits of the 16 lane products: even lanes from one widening multiply, odd from another
FFN_AVX512_TARGET FFN_INLINE __m512i mulhi32_avx512(__m512i a, __m512i b) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, b), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  return _mm512_mask_blend_epi32(static_cast<__mmask16>(0xAAAA), even, odd);
}

// dropout_row for float, 16 counters at a time with AVX-512 (bit-identical to philox_uniform:
// the same 32x32 -> 64-bit products, the same int32 -> float conversion and scaling).
FFN_AVX512_TARGET inline void dropout_row_avx512(
    uint64_t seed, uint64_t off0, int64_t n, float p, float scale, float* __restrict__ keep) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i mul_a = _mm512_set1_epi32(static_cast<int32_t>(0xD2511F53u));
  const __m512i mul_b = _mm512_set1_epi32(static_cast<int32_t>(0xCD9E8D57u));
  const __m512 unit = _mm512_set1_ps(4.6566127342e-10f);
  const __m512 pv = _mm512_set1_ps(p);
  const __m512 sv = _mm512_set1_ps(scale);
  int64_t f = 0;
  for (; f + 16 <= n; f += 16) {
    const uint64_t base = off0 + static_cast<uint64_t>(f);
    const __m512i lo_base = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base)));
    __m512i c0 = _mm512_add_epi32(lo_base, iota);
    // counters that wrapped past 2^32 carry into the high word
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0, lo_base);
    const __m512i hi = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(base >> 32)));
    __m512i c1 = _mm512_mask_add_epi32(hi, carry, hi, _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < 10; ++r) {
      const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(mulhi32_avx512(mul_b, c2), c1),
                                          _mm512_set1_epi32(static_cast<int32_t>(k0)));
      const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(mulhi32_avx512(mul_a, c0), c3),
                                          _mm512_set1_epi32(static_cast<int32_t>(k1)));
      c1 = _mm512_mullo_epi32(mul_b, c2);
      c3 = _mm512_mullo_epi32(mul_a, c0);
      c0 = n0;
      c2 = n2;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const __m512i x = _mm512_xor_si512(c0, _mm512_srai_epi32(c0, 31));  // x < 0 ? ~x : x
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(x), unit);
    const __mmask16 kept = _mm512_cmp_ps_mask(u, pv, _CMP_GE_OQ);
    _mm512_storeu_ps(keep + f, _mm512_maskz_mov_ps(kept, sv));
  }
  for (; f < n; ++f) {
    keep[f] = philox_uniform(seed, off0 + static_cast<uint64_t>(f)) >= p ? scale : 0.0f;
  }
}
#endif

template <typename acc_t, bool AVX512>
FFN_INLINE void dropout_row_isa(uint64_t seed, uint64_t off0, int64_t n, float p, acc_t scale, acc_t* keep) {
#if defined(FFN_X86_AVX512_PHILOX)
  if constexpr (AVX512 && std::is_same_v<acc_t, float>) {
    dropout_row_avx512(seed, off0, n, p, scale, keep);
    return;
  }
#endif
  dropout_row<acc_t>(seed, off0, n, p, scale, keep);
}

// Forward epilogue of one hidden row h (F,) holding x_t @ w1^T (no bias yet):
//   pre = h + b1; saved <- pre (when saved != nullptr); h <- act(pre) * keep.
// keep (F,) scratch; off0 = t * F, the row's dropout counter base.
template <typename scalar_t, typename acc_t, Act A, bool DROP, bool AVX512>
FFN_INLINE void fwd_row_impl(int64_t F, acc_t* __restrict__ hr, const acc_t* __restrict__ b1,
                             scalar_t* __restrict__ sr, uint64_t seed, uint64_t off0, float p, acc_t scale,
                             acc_t* __restrict__ keep) {
  if (b1 != nullptr) {
    for (int64_t f = 0; f < F; ++f) hr[f] += b1[f];
  }
  if (sr != nullptr) {
    for (int64_t f = 0; f < F; ++f) store_as(hr[f], sr + f);
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      // the backward recomputes from the rounded pre-activation; use the same value here
      for (int64_t f = 0; f < F; ++f) hr[f] = load_acc(sr[f], acc_t());
    }
  }
  if constexpr (DROP) {
    dropout_row_isa<acc_t, AVX512>(seed, off0, F, p, scale, keep);
    for (int64_t f = 0; f < F; ++f) hr[f] = act_value<A, acc_t>(hr[f]) * keep[f];
  } else {
    for (int64_t f = 0; f < F; ++f) hr[f] = act_value<A, acc_t>(hr[f]);
  }
}

// Backward epilogue of one row. In: dr (F,) = grad_out_t @ w2, pr (F,) the saved pre-activation.
// Out: hr (F,) = act(pre) * keep (the forward's hidden, for dW2), dr <- dr * keep * act'(pre)
// (= d pre), db1 (F,) += d pre.
template <typename scalar_t, typename acc_t, Act A, bool DROP, bool AVX512>
FFN_INLINE void bwd_row_impl(int64_t F, acc_t* __restrict__ dr, const scalar_t* __restrict__ pr,
                             acc_t* __restrict__ hr, acc_t* __restrict__ db1, uint64_t seed, uint64_t off0, float p,
                             acc_t scale, acc_t* __restrict__ keep) {
  if constexpr (DROP) dropout_row_isa<acc_t, AVX512>(seed, off0, F, p, scale, keep);
  for (int64_t f = 0; f < F; ++f) {
    acc_t v, g;
    act_value_grad<A, acc_t>(load_acc(pr[f], acc_t()), v, g);
    if constexpr (DROP) {
      const acc_t k = keep[f];
      hr[f] = v * k;
      dr[f] = dr[f] * k * g;
    } else {
      hr[f] = v;
      dr[f] = dr[f] * g;
    }
    db1[f] += dr[f];
  }
}

}  // namespace fastattn::ffn
