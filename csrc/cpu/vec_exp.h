// 2^x on a SIMD vector of floats: the one polynomial exp of the CPU attention kernels
// (attention_kernel.h's vexp / vexp_sub for AVX-512 and AVX2, attention_amx.cpp's softmax).
// Functions carry their own target attribute, so this header is included once, outside any
// `#pragma GCC target` region; they run only where the caller has checked the CPU.
#pragma once
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#include <immintrin.h>

namespace fastattn {
namespace cpu {

// 2^x = 2^n 2^f, n = round(x), f = x - n in [-1/2, 1/2]; 2^f by a polynomial of degree DEG. The
// fits in use (coefficients highest first) and their relative error on [-1/2, 1/2]:
//   7  ~5e-9 (below float rounding: exact to float32)
//   5  3e-7 in float arithmetic (the float32 softmax)
//   4  3.6e-6 (the bf16 AMX softmax: probabilities are rounded to bf16, 2^-9, anyway)
template <int DEG>
struct Exp2Poly;
template <>
struct Exp2Poly<7> {
  static constexpr float c[8] = {1.525273380405984e-05f, 1.5403530393381606e-04f, 1.3333558146428443e-03f,
                                 9.618129107628477e-03f, 5.550410866482158e-02f,  2.402265069591007e-01f,
                                 6.931471805599453e-01f, 1.0f};
};
template <>
struct Exp2Poly<5> {
  static constexpr float c[6] = {1.3260914711281657e-03f, 9.670180268585682e-03f, 5.5507123470306396e-02f,
                                 2.402222454547882e-01f,  6.931470036506653e-01f, 1.0f};
};
template <>
struct Exp2Poly<4> {
  static constexpr float c[5] = {9.676037097854473e-03f, 5.592203564726694e-02f, 2.4022107355830966e-01f,
                                 6.93121033991546e-01f, 1.0000000754953486f};
};

// AVX-512: 2^n by vscalefps (which also underflows to 0). CLAMP: x is first raised to -200 (so
// -inf gives 0, not the NaN of -inf - round(-inf)); the operand order keeps a NaN x NaN. Without
// CLAMP the caller guarantees finite x. x = +inf is the caller's to clamp (vexp does).
template <int DEG, bool CLAMP = true>
__attribute__((target("avx512f"), always_inline)) inline __m512 exp2_avx512(__m512 x) {
  if constexpr (CLAMP) x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(Exp2Poly<DEG>::c[0]);
#pragma GCC unroll 8
  for (int i = 1; i <= DEG; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(Exp2Poly<DEG>::c[i]));
  return _mm512_scalef_ps(p, n);
}

// AVX2 (no vscalefps): x is clamped to [-126, 127] and 2^n built in the exponent bits; inputs below
// -126 give 0 (a NaN x gives NaN).
template <int DEG>
__attribute__((target("avx2,fma"), always_inline)) inline __m256 exp2_avx2(__m256 x0) {
  __m256 x = _mm256_max_ps(_mm256_set1_ps(-126.f), x0);
  x = _mm256_min_ps(_mm256_set1_ps(127.f), x);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(Exp2Poly<DEG>::c[0]);
#pragma GCC unroll 8
  for (int i = 1; i <= DEG; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(Exp2Poly<DEG>::c[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  const __m256 under = _mm256_cmp_ps(x0, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  return _mm256_andnot_ps(under, r);
}

}  // namespace cpu
}  // namespace fastattn
#endif
