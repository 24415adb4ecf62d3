// Flash-style attention kernels for the CPU, written once and compiled once per instruction set.
//
// NO include guard on purpose: csrc/cpu/attention.cpp includes this file several times, each time
// inside its own namespace (fastattn::cpu_attn::avx512 / avx2 / base) and under a matching
// `#pragma GCC target(...)`, after defining FA_VEC_AVX512 or FA_VEC_AVX2 (or neither). The code
// below is therefore plain C++ on raw pointers plus <immintrin.h>; from torch it uses only the
// scalar conversions of c10::BFloat16 / c10::Half (defined outside any target region, so when not
// inlined they are baseline code): no function compiled for a wide instruction set can leak into
// code run on a narrower CPU.
//
// Layout: score tiles are kept TRANSPOSED, st[j][i] (key j, query i), one SIMD vector spanning
// W consecutive queries. Every block GEMM is then of one form,
//     C[y][x..x+W) (+)= sum_z A(y, z) * B[z][x..x+W)      (A broadcast, B rows contiguous),
// which needs no packing of K or V at all and wastes no lanes for odd head dims (E = 25):
//   forward   S^T  = K  Q^T   (y=key,   x=query, z=e)      O^T += V^T P^T (y=ev,  x=query, z=key)
//   backward  dP^T = V  dO^T  (y=key,   x=query, z=ev)     dV  += P^T dO  (y=key, x=ev,    z=query)
//             dK   += dS^T Q  (y=key,   x=e,     z=query)  dQ^T += K^T dS^T (y=e, x=query, z=key)
// and the online softmax runs down the columns of st: per-query max and sum are plain vector ops.

// ------------------------------------------------------------------------------------------------
// SIMD vectors: value_type T, W lanes, kRegs architectural registers (sizes the register tiles).

template <typename T, int N>
struct VecArr {  // portable: a fixed array the compiler vectorises for the enclosing target
  using value_type = T;
  static constexpr int W = N;
  static constexpr int kRegs = 16;
  T v[N];
  static inline VecArr load(const T* p) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = p[i];
    return r;
  }
  static inline VecArr set1(T x) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = x;
    return r;
  }
  inline void store(T* p) const {
    for (int i = 0; i < N; ++i) p[i] = v[i];
  }
  friend inline VecArr fmadd(const VecArr& a, const VecArr& b, const VecArr& c) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  friend inline VecArr operator+(const VecArr& a, const VecArr& b) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  friend inline VecArr operator-(const VecArr& a, const VecArr& b) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] - b.v[i];
    return r;
  }
  friend inline VecArr operator*(const VecArr& a, const VecArr& b) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] * b.v[i];
    return r;
  }
  friend inline VecArr vmax(const VecArr& a, const VecArr& b) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i];
    return r;
  }
  // e^x, exact to the library's exp; e^-inf = 0.
  friend inline VecArr vexp(const VecArr& a) {
    VecArr r;
    for (int i = 0; i < N; ++i) r.v[i] = std::exp(a.v[i]);
    return r;
  }
  // exp(s - m): s - m <= 0 in every use (m a row max or log-sum-exp), or -inf.
  friend inline VecArr vexp_sub(const VecArr& s, const VecArr& m) { return vexp(s - m); }
};

// VecF on one SIMD register type REG of WIDTH floats (REGS of them), PS the intrinsics' prefix.
#define FA_VECF(REG, PS, WIDTH, REGS)                                                 \
  struct VecF {                                                                       \
    using value_type = float;                                                         \
    static constexpr int W = WIDTH;                                                   \
    static constexpr int kRegs = REGS;                                                \
    REG v;                                                                            \
    static inline VecF load(const float* p) { return {PS##_loadu_ps(p)}; }            \
    static inline VecF set1(float x) { return {PS##_set1_ps(x)}; }                    \
    inline void store(float* p) const { PS##_storeu_ps(p, v); }                       \
  };                                                                                  \
  inline VecF fmadd(VecF a, VecF b, VecF c) { return {PS##_fmadd_ps(a.v, b.v, c.v)}; } \
  inline VecF operator+(VecF a, VecF b) { return {PS##_add_ps(a.v, b.v)}; }           \
  inline VecF operator-(VecF a, VecF b) { return {PS##_sub_ps(a.v, b.v)}; }           \
  inline VecF operator*(VecF a, VecF b) { return {PS##_mul_ps(a.v, b.v)}; }           \
  inline VecF vmax(VecF a, VecF b) { return {PS##_max_ps(a.v, b.v)}; }
#if defined(FA_VEC_AVX512)
FA_VECF(__m512, _mm512, 16, 32)  // 16 floats in a zmm register
// e^x = 2^(x log2 e), exact to float32 (cpu/vec_exp.h, degree 7); +inf stays +inf, -inf gives 0.
inline VecF vexp(VecF a) {
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(128.f), _mm512_mul_ps(a.v, _mm512_set1_ps(1.4426950408889634f)));
  return {fastattn::cpu::exp2_avx512<7>(x)};
}
// exp(s - m) for s - m <= 0 (a row max or log-sum-exp m; s - m = -inf gives 0): the subtraction
// first (exact when s is near m), then 2^x, x = (s - m) log2e (cpu/vec_exp.h, degree 5).
inline VecF vexp_sub(VecF s, VecF m) {
  return {fastattn::cpu::exp2_avx512<5>(_mm512_mul_ps(_mm512_sub_ps(s.v, m.v), _mm512_set1_ps(1.4426950408889634f)))};
}
#elif defined(FA_VEC_AVX2)
FA_VECF(__m256, _mm256, 8, 16)  // 8 floats in a ymm register
// As the AVX-512 one (cpu/vec_exp.h, degree 7); inputs below 2^-126 give 0.
inline VecF vexp(VecF a) {
  return {fastattn::cpu::exp2_avx2<7>(_mm256_mul_ps(a.v, _mm256_set1_ps(1.4426950408889634f)))};
}
inline VecF vexp_sub(VecF s, VecF m) { return vexp(s - m); }
#else
using VecF = VecArr<float, 8>;
#endif
#undef FA_VECF
using VecD = VecArr<double, 8>;

// ------------------------------------------------------------------------------------------------
// The one block GEMM: C[y][x] (+)= sum_{z<Z} A[y*ay + z*az] * B[z*ldb + x], for y < YR and
// x < XV*W, the YR x XV accumulator tile held in registers. An epilogue EP works on the tile while
// it is still in registers (aux: one value per column x; aux2: a matrix laid out like C):
//   kStore   plain store;
//   kColMax  store, and aux[x] = max(aux[x], max_y C[y][x])   (the forward's running max);
//   kExp     C = exp(C - aux[x])                                (the backward's P from lse);
//   kDs      C = aux2 * (C - aux[x])                             (the backward's dS = P (dP - delta));
//   kScaleC  (a prologue) with ACC, C starts as C[y][x] * aux[x]  (the forward's online rescale).
enum Epilogue { kStore = 0, kColMax = 1, kExp = 2, kDs = 3, kScaleC = 4 };

template <typename V, int YR, int XV, bool ACC, int EP>
inline void micro_tile(int64_t Z, const typename V::value_type* A, int64_t ay, int64_t az,
                       const typename V::value_type* B, int64_t ldb, typename V::value_type* C,
                       int64_t ldc, typename V::value_type* aux, const typename V::value_type* aux2) {
  constexpr int W = V::W;
  V c[YR][XV];
#pragma GCC unroll 16
  for (int y = 0; y < YR; ++y)
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      if constexpr (ACC && EP == kScaleC)
        c[y][x] = V::load(C + y * ldc + x * W) * V::load(aux + x * W);
      else
        c[y][x] = ACC ? V::load(C + y * ldc + x * W) : V::set1(0);
    }
  for (int64_t z = 0; z < Z; ++z) {
    V b[XV];
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) b[x] = V::load(B + z * ldb + x * W);
    const auto* a = A + z * az;
#pragma GCC unroll 16
    for (int y = 0; y < YR; ++y) {
      const V ay_ = V::set1(a[y * ay]);
#pragma GCC unroll 4
      for (int x = 0; x < XV; ++x) c[y][x] = fmadd(ay_, b[x], c[y][x]);
    }
  }
  if constexpr (EP == kExp) {
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      const V sh = V::load(aux + x * W);
#pragma GCC unroll 16
      for (int y = 0; y < YR; ++y) c[y][x] = vexp_sub(c[y][x], sh);
    }
  }
  if constexpr (EP == kDs) {
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      const V d = V::load(aux + x * W);
#pragma GCC unroll 16
      for (int y = 0; y < YR; ++y) c[y][x] = V::load(aux2 + y * ldc + x * W) * (c[y][x] - d);
    }
  }
#pragma GCC unroll 16
  for (int y = 0; y < YR; ++y)
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) c[y][x].store(C + y * ldc + x * W);
  if constexpr (EP == kColMax) {
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      V m = V::load(aux + x * W);
#pragma GCC unroll 16
      for (int y = 0; y < YR; ++y) m = vmax(m, c[y][x]);
      m.store(aux + x * W);
    }
  }
}

template <typename V>
constexpr int max_rows(int xv) {
  // accumulators + XV loads of B + one broadcast must fit in the register file
  return (V::kRegs - xv - 1) / xv < 16 ? (V::kRegs - xv - 1) / xv : 16;
}

template <typename V, int XV, bool ACC, int EP>
inline void micro_rows(int yr, int64_t Z, const typename V::value_type* A, int64_t ay, int64_t az,
                       const typename V::value_type* B, int64_t ldb, typename V::value_type* C,
                       int64_t ldc, typename V::value_type* aux, const typename V::value_type* aux2) {
#define FA_CASE(R)                                                           \
  case R:                                                                    \
    if constexpr (R <= max_rows<V>(XV)) {                                    \
      micro_tile<V, R, XV, ACC, EP>(Z, A, ay, az, B, ldb, C, ldc, aux, aux2); \
      return;                                                                \
    }                                                                        \
    break;
  switch (yr) {
    FA_CASE(1) FA_CASE(2) FA_CASE(3) FA_CASE(4) FA_CASE(5) FA_CASE(6) FA_CASE(7) FA_CASE(8)
    FA_CASE(9) FA_CASE(10) FA_CASE(11) FA_CASE(12) FA_CASE(13) FA_CASE(14) FA_CASE(15) FA_CASE(16)
    default: break;
  }
#undef FA_CASE
}

// The tile walk of block_gemm (and attention_bf16dot.h's dp_gemm) over C (Y x X): the columns, in
// vectors of W, cut into strips of xv = pick(vectors left) vectors, each strip into balanced row
// tiles of at most rows(xv) rows; tile(xv, yr, a, b, c, xa, xa2) runs one, given the pointers at its
// corner (A rows y0.. with row stride ay, B columns x0.., C and aux2 at (y0, x0), aux at x0).
template <typename TA, typename TC, typename Pick, typename Rows, typename Tile>
inline void walk_tiles(int64_t Y, int64_t X, int W, const TA* A, int64_t ay, const TA* B, TC* C, int64_t ldc,
                       TC* aux, const TC* aux2, Pick pick, Rows rows, Tile tile) {
  int64_t xv_left = X / W;
  int64_t x0 = 0;
  while (xv_left > 0) {
    const int xv = pick(xv_left);
    const int rmax = rows(xv);
    const int64_t tiles = (Y + rmax - 1) / rmax;
    const int64_t yr_even = tiles > 0 ? (Y + tiles - 1) / tiles : 0;  // balanced row tiles
    for (int64_t y0 = 0; y0 < Y; y0 += yr_even) {
      const int yr = static_cast<int>(Y - y0 < yr_even ? Y - y0 : yr_even);
      tile(xv, yr, A + y0 * ay, B + x0, C + y0 * ldc + x0, aux == nullptr ? nullptr : aux + x0,
           aux2 == nullptr ? nullptr : aux2 + y0 * ldc + x0);
    }
    x0 += xv * W;
    xv_left -= xv;
  }
}

// C (Y x X) (+)= A (Y x Z, strides ay, az) * B (Z x X, row stride ldb); X a multiple of W.
// EP, aux, aux2: the epilogue (see micro_tile); aux is indexed by column, aux2 like C.
template <typename V, bool ACC, int EP = kStore>
inline void block_gemm(int64_t Y, int64_t X, int64_t Z, const typename V::value_type* A, int64_t ay,
                       int64_t az, const typename V::value_type* B, int64_t ldb,
                       typename V::value_type* C, int64_t ldc, typename V::value_type* aux = nullptr,
                       const typename V::value_type* aux2 = nullptr) {
  using T = typename V::value_type;
  constexpr int kMaxXV = V::kRegs >= 32 ? 4 : 2;
  walk_tiles(
      Y, X, V::W, A, ay, B, C, ldc, aux, aux2,
      [](int64_t left) { return static_cast<int>(left < kMaxXV ? left : kMaxXV); },
      [](int xv) { return max_rows<V>(xv); },
      [&](int xv, int yr, const T* a, const T* b, T* c, T* xa, const T* xa2) {
        switch (xv) {
          case 4: micro_rows<V, kMaxXV >= 4 ? 4 : 1, ACC, EP>(yr, Z, a, ay, az, b, ldb, c, ldc, xa, xa2); break;
          case 3: micro_rows<V, kMaxXV >= 3 ? 3 : 1, ACC, EP>(yr, Z, a, ay, az, b, ldb, c, ldc, xa, xa2); break;
          case 2: micro_rows<V, 2, ACC, EP>(yr, Z, a, ay, az, b, ldb, c, ldc, xa, xa2); break;
          default: micro_rows<V, 1, ACC, EP>(yr, Z, a, ay, az, b, ldb, c, ldc, xa, xa2); break;
        }
      });
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// True when every key in [j0, j0 + n) of batch row b is padded out.
inline bool keys_all_padded(const AttnParams& p, int64_t b, int64_t j0, int64_t n) {
  if (p.kpm == nullptr) return false;
  const bool* row = p.kpm + b * p.S + j0;
  for (int64_t j = 0; j < n; ++j)
    if (!row[j]) return false;
  return true;
}

// True when mask_tile may change the tile of queries i0.. against keys j0..j0+nb: the kernels
// fuse softmax steps into the GEMM epilogues only for tiles it leaves alone.
inline bool tile_needs_mask(const AttnParams& p, int64_t i0, int64_t j0, int64_t nb) {
  return p.mask != nullptr || p.kpm != nullptr || (p.causal && j0 + nb - 1 > i0);
}

// Applies attn_mask, causality and key padding to the transposed score tile st[j][i] (ld = BM) of
// queries i0.. (mrows valid) against keys j0.. (nb of them), head (b, h).
template <typename T, typename In>
inline void mask_tile(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t mrows, int64_t j0,
                      int64_t nb, T* st, int64_t BM) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (p.mask != nullptr) {  // additive, in T (float32 for 16-bit inputs); only -inf excludes a key
    const T* m = static_cast<const T*>(p.mask) + b * p.msb + h * p.msh + i0 * p.msl + j0 * p.mss;
    for (int64_t i = 0; i < mrows; ++i) {
      const T* row = m + i * p.msl;
      for (int64_t j = 0; j < nb; ++j) {
        const T mv = row[j * p.mss];
        st[j * BM + i] = mv == kNegInf ? kNegInf : st[j * BM + i] + mv;
      }
    }
  }
  if (p.causal && j0 + nb - 1 > i0) {
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t first = j0 + j - i0;  // queries i < first (i.e. i0+i < j0+j) cannot see key j
      const int64_t stop = first < BM ? first : BM;
      for (int64_t i = 0; i < stop; ++i) st[j * BM + i] = kNegInf;
    }
  }
  if (p.kpm != nullptr) {
    const bool* row = p.kpm + b * p.S + j0;
    for (int64_t j = 0; j < nb; ++j)
      if (row[j])
        for (int64_t i = 0; i < BM; ++i) st[j * BM + i] = kNegInf;
  }
}

// Running column maxima of st (nb rows, row stride BM): m[x] = max(m[x], max_j st[j][x]), with
// the previous m saved to old. Four columns of vectors at a time: independent max chains.
template <typename V>
inline void col_max(const typename V::value_type* st, int64_t nb, int64_t BM, typename V::value_type* m,
                    typename V::value_type* old) {
  constexpr int W = V::W;
  int64_t x = 0;
  for (; x + 4 * W <= BM; x += 4 * W) {
    V m0 = V::load(m + x), m1 = V::load(m + x + W), m2 = V::load(m + x + 2 * W), m3 = V::load(m + x + 3 * W);
    m0.store(old + x);
    m1.store(old + x + W);
    m2.store(old + x + 2 * W);
    m3.store(old + x + 3 * W);
    for (int64_t j = 0; j < nb; ++j) {
      const auto* r = st + j * BM + x;
      m0 = vmax(m0, V::load(r));
      m1 = vmax(m1, V::load(r + W));
      m2 = vmax(m2, V::load(r + 2 * W));
      m3 = vmax(m3, V::load(r + 3 * W));
    }
    m0.store(m + x);
    m1.store(m + x + W);
    m2.store(m + x + 2 * W);
    m3.store(m + x + 3 * W);
  }
  for (; x < BM; x += W) {
    V m0 = V::load(m + x);
    m0.store(old + x);
    for (int64_t j = 0; j < nb; ++j) m0 = vmax(m0, V::load(st + j * BM + x));
    m0.store(m + x);
  }
}

// Copies rows x cols of `src` (type In) into `dst` (type T); returns dst, or src itself when the
// types agree (no copy needed).
template <typename T, typename In>
inline const T* as_compute(const In* src, int64_t n, T* dst) {
  if constexpr (std::is_same<T, In>::value) {
    return src;
  } else if constexpr (std::is_same<T, float>::value && std::is_same<In, c10::BFloat16>::value) {
    // bfloat16 is the top half of a float: a shift the compiler vectorises
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
    return dst;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
    return dst;
  }
}

#if defined(FA_VEC_AVX512)
// In-register transpose of 16 rows of 16 floats: on return r[c] holds column c.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {  // per 128-bit lane: (a0 b0 a1 b1), (a2 b2 a3 b3)
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // r[4k+m], lane L: rows 4k..4k+3 of column 4L+m
    r[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {  // a 4 x 4 transpose of 128-bit lanes across r[m], r[4+m], r[8+m], r[12+m]
    const __m512 ab_lo = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44);
    const __m512 ab_hi = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xEE);
    const __m512 cd_lo = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
    const __m512 cd_hi = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xEE);
    t[m] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(ab_lo, cd_lo, 0xDD);
    t[8 + m] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(ab_hi, cd_hi, 0xDD);
  }
  for (int c = 0; c < 16; ++c) r[c] = t[c];
}
#endif

// dst[c * ldd + r] = T(src[r * lds + c]) * s for r < R, c < C: a block read transposed (Q^T, dO^T).
template <typename T, typename In>
inline void load_transposed(const In* src, int64_t lds, int64_t R, int64_t C, T s, T* dst, int64_t ldd) {
  int64_t r0 = 0;
#if defined(FA_VEC_AVX512)
  if constexpr (std::is_same<T, float>::value && std::is_same<In, float>::value) {
    const __m512 vs = _mm512_set1_ps(s);
    for (; r0 + 16 <= R; r0 += 16)
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int64_t n = C - c0 < 16 ? C - c0 : 16;
        const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
        __m512 r[16];
        for (int k = 0; k < 16; ++k) r[k] = _mm512_maskz_loadu_ps(m, src + (r0 + k) * lds + c0);
        transpose16(r);
        for (int64_t c = 0; c < n; ++c) _mm512_storeu_ps(dst + (c0 + c) * ldd + r0, _mm512_mul_ps(r[c], vs));
      }
  }
#endif
  for (int64_t c = 0; c < C; ++c)
    for (int64_t r = r0; r < R; ++r) dst[c * ldd + r] = static_cast<T>(src[r * lds + c]) * s;
}

// dst[r * ldd + c] = In(src[c * lds + r] * f_r) for r < R, c < C, f_r = f[r] (or s when f is null):
// a transposed accumulator written out row by row (O, dQ).
template <typename T, typename In>
inline void store_transposed(const T* src, int64_t lds, int64_t R, int64_t C, const T* f, T s, In* dst,
                             int64_t ldd) {
  int64_t r0 = 0;
#if defined(FA_VEC_AVX512)
  if constexpr (std::is_same<T, float>::value && std::is_same<In, float>::value) {
    for (; r0 + 16 <= R; r0 += 16)
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        const int64_t n = C - c0 < 16 ? C - c0 : 16;
        const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
        __m512 r[16];
        for (int k = 0; k < 16; ++k)
          r[k] = k < n ? _mm512_loadu_ps(src + (c0 + k) * lds + r0) : _mm512_setzero_ps();
        transpose16(r);
        for (int k = 0; k < 16; ++k) {
          const __m512 fr = _mm512_set1_ps(f != nullptr ? f[r0 + k] : s);
          _mm512_mask_storeu_ps(dst + (r0 + k) * ldd + c0, m, _mm512_mul_ps(r[k], fr));
        }
      }
  }
#endif
  for (int64_t r = r0; r < R; ++r) {
    const T fr = f != nullptr ? f[r] : s;
    for (int64_t c = 0; c < C; ++c) dst[r * ldd + c] = static_cast<In>(src[c * lds + r] * fr);
  }
}

inline uint64_t dropout_offset(const AttnParams& p, int64_t b, int64_t h, int64_t i, int64_t j) {
  return static_cast<uint64_t>(((b * p.Hq + h) * p.L + i) * p.S + j);
}

// ------------------------------------------------------------------------------------------------
// Forward: one task = (batch b, query head h, query block qb) of BM queries.

template <typename V, typename In>
void fwd_tasks(const AttnParams& p, int64_t task_begin, int64_t task_end) {
  using T = typename V::value_type;
  constexpr int W = V::W;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t BM = p.bm, BN = p.bn, E = p.E, Ev = p.Ev, L = p.L, S = p.S;
  const int64_t nqb = (L + BM - 1) / BM;
  const int64_t group = p.Hq / p.Hkv;
  constexpr bool kConvert = !std::is_same<T, In>::value;
  std::vector<T> buf(E * BM + BN * BM + Ev * BM + 3 * BM + (kConvert ? BN * (E + Ev) : 0));
  T* qt = buf.data();     // (E, BM)   Q^T of the block, times scale
  T* st = qt + E * BM;    // (BN, BM)  scores, then probabilities, transposed
  T* ot = st + BN * BM;   // (Ev, BM)  unnormalised output, transposed
  T* mrow = ot + Ev * BM; // (BM)      running max
  T* lrow = mrow + BM;    // (BM)      running sum
  T* arow = lrow + BM;    // (BM)      rescale factor of this step
  T* kbuf = arow + BM;    // (BN, E), (BN, Ev): the K and V blocks in T when In is narrower
  T* vbuf = kbuf + BN * E;
  const T keep_scale = p.dropout_p > 0 ? T(1) / (T(1) - T(p.dropout_p)) : T(1);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t qb = task % nqb, bh = task / nqb, h = bh % p.Hq, b = bh / p.Hq;
    const int64_t i0 = qb * BM, mrows = std::min(BM, L - i0);
    const In* Q = static_cast<const In*>(p.q) + (bh * L + i0) * E;
    const int64_t bhk = b * p.Hkv + h / group;
    const In* K = static_cast<const In*>(p.k) + bhk * S * E;
    const In* Vm = static_cast<const In*>(p.v) + bhk * S * Ev;
    const T scale = static_cast<T>(p.scale);
    load_transposed<T, In>(Q, E, mrows, E, scale, qt, BM);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t i = mrows; i < BM; ++i) qt[e * BM + i] = T(0);
    std::fill(ot, ot + Ev * BM, T(0));
    std::fill(mrow, mrow + BM, kNegInf);
    std::fill(lrow, lrow + BM, T(0));
    const int64_t kend = p.causal ? std::min(S, i0 + mrows) : S;
    bool have_out = false;
    for (int64_t j0 = 0; j0 < kend; j0 += BN) {
      const int64_t nb = std::min(BN, kend - j0);
      if (keys_all_padded(p, b, j0, nb)) continue;
      const T* Kb = as_compute<T, In>(K + j0 * E, nb * E, kbuf);
      if (!tile_needs_mask(p, i0, j0, nb)) {
        std::copy(mrow, mrow + BM, arow);  // old max -> arow; the GEMM folds the new one into mrow
        block_gemm<V, false, kColMax>(nb, BM, E, Kb, E, 1, qt, BM, st, BM, mrow);
      } else {
        block_gemm<V, false>(nb, BM, E, Kb, E, 1, qt, BM, st, BM);
        mask_tile<T, In>(p, b, h, i0, mrows, j0, nb, st, BM);
        col_max<V>(st, nb, BM, mrow, arow);  // new max -> mrow, old max -> arow
      }
      for (int64_t x = 0; x < BM; x += W) {
        const V mold = V::load(arow + x);
        const V mb = V::load(mrow + x);
        // a column that has seen only -inf keeps max -inf; subtracting the lowest finite value
        // instead makes its probabilities and its rescale factor exact zeros, never NaN
        const V sh = vmax(V::set1(std::numeric_limits<T>::lowest()), mb);  // a NaN max stays NaN
        const V alpha = vexp_sub(mold, sh);
        alpha.store(arow + x);
        V sum0 = V::set1(0), sum1 = V::set1(0);
        int64_t j = 0;
        for (; j + 2 <= nb; j += 2) {
          const V p0 = vexp_sub(V::load(st + j * BM + x), sh);
          const V p1 = vexp_sub(V::load(st + (j + 1) * BM + x), sh);
          p0.store(st + j * BM + x);
          p1.store(st + (j + 1) * BM + x);
          sum0 = sum0 + p0;
          sum1 = sum1 + p1;
        }
        if (j < nb) {
          const V p0 = vexp_sub(V::load(st + j * BM + x), sh);
          p0.store(st + j * BM + x);
          sum0 = sum0 + p0;
        }
        const V sum = sum0 + sum1;
        fmadd(V::load(lrow + x), alpha, sum).store(lrow + x);
      }
      if (p.dropout_p > 0) {
        for (int64_t i = 0; i < mrows; ++i) {
          const uint64_t off = dropout_offset(p, b, h, i0 + i, j0);
          for (int64_t j = 0; j < nb; ++j) {
            const bool keep = fastattn::philox_uniform(p.seed, off + j) >= p.dropout_p;
            st[j * BM + i] = keep ? st[j * BM + i] * keep_scale : T(0);
          }
        }
      }
      // O^T = O^T * alpha + V^T P^T, the rescale folded into the GEMM's load of O^T (the first
      // block visited has nothing to rescale: O^T = V^T P^T)
      const T* Vb = as_compute<T, In>(Vm + j0 * Ev, nb * Ev, vbuf);
      if (have_out)
        block_gemm<V, true, kScaleC>(Ev, BM, nb, Vb, 1, Ev, st, BM, ot, BM, arow);
      else
        block_gemm<V, false>(Ev, BM, nb, Vb, 1, Ev, st, BM, ot, BM);
      have_out = true;
    }
    In* O = static_cast<In*>(p.out) + (bh * L + i0) * Ev;
    float* lse = p.lse + bh * L + i0;
    for (int64_t i = 0; i < mrows; ++i) {
      const T l = lrow[i];
      arow[i] = l != T(0) ? T(1) / l : T(0);  // 1/l, or 0 for a row that saw no key (NaN stays NaN)
      lse[i] = l != T(0) ? static_cast<float>(mrow[i] + std::log(l)) : std::numeric_limits<float>::infinity();
    }
    store_transposed<T, In>(ot, BM, mrows, Ev, arow, T(1), O, Ev);
  }
}

// ------------------------------------------------------------------------------------------------
// The log-sum-exp of every query row of head (b, h), recomputed in T and kept in two parts: the row
// max lm[i] and the log of the sum ll[i] (lm = 0, ll = +inf for a row that sees no key). The float32
// lse the forward hands over is one number m + log l, rounded to the ulp of m: float64 calls (whose
// gradients it would cap at float32 accuracy) and rows with |lse| >= kSplitLse (whose P it would
// get wrong by up to ulp(lse)/2 relative, or by a factor S when log l vanishes against m = -1e30)
// recompute it, and the backward then forms P = exp((s - lm) - ll): s - lm exact as in the forward.
// qt: (E, Lp) Q^T times scale; st: (BN, BM) scratch; m, l: (BM) scratch; kscr: (BN, E) scratch
// for K in T when In is narrower. With dlt (Lp) given (no dropout), also delta = rowsum(P dP) of
// every row, P unrounded and dP = dO V^T by the backward's own GEMM (dot: (Ev, Lp) dO^T; vscr:
// (BN, Ev) V in T; dpt: (BN, BM), dd: (BM) scratch): these rows have large logits, where
// rowsum(dO O) from the output rounded to 16 bits is off by about 2^-9 |dO| |O| and any rounding
// apart from dP is carried into dQ and dK multiplied by the logit scale.
constexpr float kSplitLse = 32.f;

template <typename V, typename In>
void exact_lse(const AttnParams& p, int64_t b, int64_t h, const typename V::value_type* qt, int64_t Lp,
               typename V::value_type* st, typename V::value_type* m, typename V::value_type* l,
               typename V::value_type* kscr, typename V::value_type* lm, typename V::value_type* ll,
               const typename V::value_type* dot = nullptr, typename V::value_type* vscr = nullptr,
               typename V::value_type* dpt = nullptr, typename V::value_type* dd = nullptr,
               typename V::value_type* dlt = nullptr) {
  using T = typename V::value_type;
  constexpr int W = V::W;
  const int64_t BM = p.bm, BN = p.bn, E = p.E, Ev = p.Ev, L = p.L, S = p.S;
  const In* K = static_cast<const In*>(p.k) + (b * p.Hkv + h / (p.Hq / p.Hkv)) * S * E;
  const In* Vsrc = static_cast<const In*>(p.v) + (b * p.Hkv + h / (p.Hq / p.Hkv)) * S * Ev;
  for (int64_t i0 = 0; i0 < L; i0 += BM) {
    const int64_t mrows = std::min(BM, L - i0);
    std::fill(m, m + BM, -std::numeric_limits<T>::infinity());
    std::fill(l, l + BM, T(0));
    if (dlt != nullptr) std::fill(dd, dd + BM, T(0));  // the running rowsum(P dP), rescaled like l
    const int64_t kend = p.causal ? std::min(S, i0 + mrows) : S;
    for (int64_t j0 = 0; j0 < kend; j0 += BN) {
      const int64_t nb = std::min(BN, kend - j0);
      if (keys_all_padded(p, b, j0, nb)) continue;
      const T* Kb = as_compute<T, In>(K + j0 * E, nb * E, kscr);
      block_gemm<V, false>(nb, BM, E, Kb, E, 1, qt + i0, Lp, st, BM);
      mask_tile<T, In>(p, b, h, i0, mrows, j0, nb, st, BM);
      if (dlt != nullptr)
        block_gemm<V, false>(nb, BM, Ev, as_compute<T, In>(Vsrc + j0 * Ev, nb * Ev, vscr), Ev, 1, dot + i0, Lp,
                             dpt, BM);
      for (int64_t x = 0; x < BM; x += W) {
        V mb = V::load(m + x);
        const V mold = mb;
        for (int64_t j = 0; j < nb; ++j) mb = vmax(mb, V::load(st + j * BM + x));
        mb.store(m + x);
        const V msafe = vmax(V::set1(std::numeric_limits<T>::lowest()), mb);
        V sum = V::set1(0), sdp = V::set1(0);
        for (int64_t j = 0; j < nb; ++j) {
          const V pj = vexp(V::load(st + j * BM + x) - msafe);
          sum = sum + pj;
          if (dlt != nullptr) sdp = fmadd(pj, V::load(dpt + j * BM + x), sdp);
        }
        const V alpha = vexp(mold - msafe);
        fmadd(V::load(l + x), alpha, sum).store(l + x);
        if (dlt != nullptr) fmadd(V::load(dd + x), alpha, sdp).store(dd + x);
      }
    }
    for (int64_t i = 0; i < mrows; ++i) {
      lm[i0 + i] = l[i] != T(0) ? m[i] : T(0);
      ll[i0 + i] = l[i] != T(0) ? std::log(l[i]) : std::numeric_limits<T>::infinity();
      if (dlt != nullptr) dlt[i0 + i] = l[i] != T(0) ? dd[i] / l[i] : T(0);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Backward: one task = (batch b, kv head hk, key range [key_lo, key_hi)); it walks the GQA group's
// query heads, its key blocks, and every query block that can see them, in a fixed order.
// dK and dV of its keys are its own; dQ goes to p.dq_part[part] (the compute type T, (N, Hq, L, E)), one
// partial per key range, summed in a fixed order by the caller (or written straight to p.dq when
// there is a single key range).

// One backward task: key range `part` (keys [key_lo, key_lo + nk)) of batch b, kv head hk (bhk = b Hkv + hk).
struct BwdTask {
  int64_t part, bhk, b, hk, key_lo, nk;
};
inline BwdTask bwd_task(const AttnParams& p, int64_t task, int64_t part_len) {
  const int64_t bhk = task / p.key_parts, part = task % p.key_parts;
  const int64_t key_lo = std::min(p.S, part * part_len);
  return {part, bhk, bhk / p.Hkv, bhk % p.Hkv, key_lo, std::min(p.S, key_lo + part_len) - key_lo};
}

// Query head g of kv head hk's GQA group in batch b: h, bh = b Hq + h, and its Q, dO, O rows and lse.
template <typename In>
struct BwdHead {
  int64_t h, bh;
  const In *Q, *dO, *O;
  const float* LSE;
};
template <typename In>
inline BwdHead<In> bwd_head(const AttnParams& p, int64_t b, int64_t hk, int64_t g) {
  const int64_t h = hk * (p.Hq / p.Hkv) + g, bh = b * p.Hq + h;
  return {h, bh, static_cast<const In*>(p.q) + bh * p.L * p.E, static_cast<const In*>(p.dout) + bh * p.L * p.Ev,
          static_cast<const In*>(p.o) + bh * p.L * p.Ev, p.lse + bh * p.L};
}

// Whether a head's rows need the split log-sum-exp (see exact_lse): some finite |lse| >= kSplitLse.
inline bool lse_needs_split(const float* LSE, int64_t L) {
  bool split = false;
  for (int64_t i = 0; i < L; ++i)
    split |= std::abs(LSE[i]) >= kSplitLse && LSE[i] != std::numeric_limits<float>::infinity();
  return split;
}

// dS^T = P^T (dP^T - delta) of a (BN, BM) tile whose GEMM did not fuse it (masked tile or dropout).
// With dropout also P^T as the dV GEMM takes it, Z P / (1 - p), and dS = 0 on rows past mrows.
template <typename V>
inline void ds_tile(const AttnParams& p, int64_t b, int64_t h, int64_t i0, int64_t mrows, int64_t j0, int64_t nb,
                    typename V::value_type* st, typename V::value_type* dst, const typename V::value_type* delta,
                    typename V::value_type keep_scale) {
  using T = typename V::value_type;
  constexpr int W = V::W;
  const int64_t BM = p.bm;
  if (p.dropout_p > 0) {
    for (int64_t i = 0; i < mrows; ++i) {
      const uint64_t off = dropout_offset(p, b, h, i0 + i, j0);
      const T di = delta[i0 + i];
      for (int64_t j = 0; j < nb; ++j) {
        const bool keep = fastattn::philox_uniform(p.seed, off + j) >= p.dropout_p;
        const T pij = st[j * BM + i];
        const T dpij = keep ? dst[j * BM + i] * keep_scale : T(0);
        dst[j * BM + i] = pij * (dpij - di);
        st[j * BM + i] = keep ? pij * keep_scale : T(0);
      }
    }
    for (int64_t i = mrows; i < BM; ++i)
      for (int64_t j = 0; j < nb; ++j) dst[j * BM + i] = T(0);
  } else {
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t x = 0; x < BM; x += W) {
        const V pj = V::load(st + j * BM + x);
        (pj * (V::load(dst + j * BM + x) - V::load(delta + i0 + x))).store(dst + j * BM + x);
      }
  }
}

template <typename V, typename In>
void bwd_tasks(const AttnParams& p, int64_t task_begin, int64_t task_end) {
  using T = typename V::value_type;
  constexpr int W = V::W;
  const int64_t BM = p.bm, BN = p.bn, E = p.E, Ev = p.Ev, L = p.L, S = p.S;
  const int64_t Lp = round_up(L, BM), Ep = round_up(E, W), Evp = round_up(Ev, W);
  const int64_t group = p.Hq / p.Hkv;
  const int64_t nparts = p.key_parts;
  const int64_t part_len = round_up((S + nparts - 1) / nparts, BN);
  constexpr bool kConvert = !std::is_same<T, In>::value;
  std::vector<T> buf(E * Lp + Lp * Ep + 2 * Ev * Lp + Lp * Evp + 3 * Lp + E * Lp + 2 * BN * BM +
                     part_len * Ep + part_len * Evp + 2 * BM +
                     (kConvert ? part_len * (E + Ev) + BN * E : 0) + BN * Ev + Lp + BM);
  T* qt = buf.data();        // (E, Lp)   Q^T times scale
  T* qn = qt + E * Lp;       // (Lp, Ep)  Q, zero padded
  T* dot = qn + Lp * Ep;     // (Ev, Lp)  dO^T
  T* don = dot + Ev * Lp;    // (Lp, Evp) dO, zero padded
  T* delta = don + Lp * Evp; // (Lp)      rowsum(dO * O)
  T* lse = delta + Lp;       // (Lp)      forward log-sum-exp (+inf on padding rows)
  T* dqt = lse + Lp;         // (E, Lp)   dQ^T accumulator
  T* st = dqt + E * Lp;      // (BN, BM)  P^T, then dropped P^T
  T* dst = st + BN * BM;     // (BN, BM)  dP^T, then dS^T
  T* dk = dst + BN * BM;     // (part_len, Ep)
  T* dv = dk + part_len * Ep; // (part_len, Evp)
  T* mrow = dv + part_len * Evp; // (BM) running max / sum of the float64 log-sum-exp pass
  T* lrow = mrow + BM;
  T* kbuf = lrow + BM;             // (part_len, E), (part_len, Ev): K, V of the range in T
  T* vbuf = kbuf + part_len * E;
  T* kscr = lrow + BM + (kConvert ? part_len * (E + Ev) : 0);  // (BN, E) K in T for exact_lse (kConvert only)
  T* lm = kscr + (kConvert ? BN * E : 0);  // (Lp) row max of a split log-sum-exp (see exact_lse)
  T* otr = lm + Lp;                        // (Ev, Lp) O^T in T, for delta
  T* vscr = otr + Ev * Lp;                 // (BN, Ev) V in T for exact_lse
  T* dlt = vscr + BN * Ev;                 // (Lp) exact_lse's rowsum(P dP)
  T* ddr = dlt + Lp;                       // (BM) its scratch
  const T keep_scale = p.dropout_p > 0 ? T(1) / (T(1) - T(p.dropout_p)) : T(1);
  const T scale = static_cast<T>(p.scale);
  const int64_t nqb = Lp / BM;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const auto [part, bhk, b, hk, key_lo, nk] = bwd_task(p, task, part_len);
    const T* K = as_compute<T, In>(static_cast<const In*>(p.k) + (bhk * S + key_lo) * E, nk * E, kbuf);
    const T* Vm = as_compute<T, In>(static_cast<const In*>(p.v) + (bhk * S + key_lo) * Ev, nk * Ev, vbuf);
    std::fill(dk, dk + part_len * Ep, T(0));
    std::fill(dv, dv + part_len * Evp, T(0));
    for (int64_t g = 0; g < group && nk > 0; ++g) {
      const auto [h, bh, Q, dO, O, LSE] = bwd_head<In>(p, b, hk, g);
      load_transposed<T, In>(Q, E, L, E, scale, qt, Lp);
      load_transposed<T, In>(dO, Ev, L, Ev, T(1), dot, Lp);
      load_transposed<T, In>(O, Ev, L, Ev, T(1), otr, Lp);
      for (int64_t e = 0; e < E; ++e) std::fill(qt + e * Lp + L, qt + (e + 1) * Lp, T(0));
      for (int64_t e = 0; e < Ev; ++e) std::fill(dot + e * Lp + L, dot + (e + 1) * Lp, T(0));
      for (int64_t e = 0; e < Ev; ++e) std::fill(otr + e * Lp + L, otr + (e + 1) * Lp, T(0));
      std::fill(qn, qn + Lp * Ep, T(0));
      std::fill(don, don + Lp * Evp, T(0));
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t e = 0; e < E; ++e) qn[i * Ep + e] = static_cast<T>(Q[i * E + e]);
        for (int64_t e = 0; e < Ev; ++e) don[i * Evp + e] = static_cast<T>(dO[i * Ev + e]);
        lse[i] = static_cast<T>(LSE[i]);
      }
      for (int64_t i = L; i < Lp; ++i) lse[i] = std::numeric_limits<T>::infinity();
      const bool split = lse_needs_split(LSE, L);  // P = exp((s - lm) - lse) with lse = log l (see exact_lse)
      if (split || std::is_same<T, double>::value) {
        std::fill(lm, lm + Lp, T(0));
        // with dropout delta is rowsum(P Z dP) / (1 - p): keep rowsum(dO O) there
        exact_lse<V, In>(p, b, h, qt, Lp, st, mrow, lrow, kscr, lm, lse, dot, vscr, dst, ddr,
                         p.dropout_p == 0 ? dlt : nullptr);
        if (!split)
          for (int64_t i = 0; i < L; ++i) lse[i] += lm[i];
      }
      // delta = rowsum(dO O) by the same chain of fmadd as each dP = dO . v_j of the GEMM below, so
      // that a row whose P is one-hot gets dP - delta = 0 exactly (as torch's rowsum(P dP) does)
      for (int64_t x = 0; x < Lp; x += W) {
        V acc = V::set1(0);
        for (int64_t e = 0; e < Ev; ++e) acc = fmadd(V::load(otr + e * Lp + x), V::load(dot + e * Lp + x), acc);
        acc.store(delta + x);
      }
      if ((split || std::is_same<T, double>::value) && p.dropout_p == 0) std::copy(dlt, dlt + L, delta);
      std::fill(dqt, dqt + E * Lp, T(0));
      for (int64_t jj = 0; jj < nk; jj += BN) {
        const int64_t j0 = key_lo + jj, nb = std::min(BN, nk - jj);
        if (keys_all_padded(p, b, j0, nb)) continue;
        const int64_t qb0 = p.causal ? std::min(nqb, j0 / BM) : 0;
        for (int64_t qb = qb0; qb < nqb; ++qb) {
          const int64_t i0 = qb * BM, mrows = std::min(BM, L - i0);
          const bool plain = !split && !tile_needs_mask(p, i0, j0, nb);
          if (plain) {  // P^T = exp(S^T - lse) straight from the GEMM's registers
            block_gemm<V, false, kExp>(nb, BM, E, K + jj * E, E, 1, qt + i0, Lp, st, BM, lse + i0);
          } else {
            block_gemm<V, false>(nb, BM, E, K + jj * E, E, 1, qt + i0, Lp, st, BM);
            mask_tile<T, In>(p, b, h, i0, mrows, j0, nb, st, BM);
            for (int64_t j = 0; j < nb; ++j)
              for (int64_t x = 0; x < BM; x += W) {
                V sj = V::load(st + j * BM + x);
                if (split) sj = sj - V::load(lm + i0 + x);
                vexp_sub(sj, V::load(lse + i0 + x)).store(st + j * BM + x);
              }
          }
          if (plain && p.dropout_p == 0) {  // dS^T = P^T (dP^T - delta), also in the epilogue
            block_gemm<V, false, kDs>(nb, BM, Ev, Vm + jj * Ev, Ev, 1, dot + i0, Lp, dst, BM, delta + i0, st);
          } else {
            block_gemm<V, false>(nb, BM, Ev, Vm + jj * Ev, Ev, 1, dot + i0, Lp, dst, BM);
          }
          if (p.dropout_p > 0 || !plain) ds_tile<V>(p, b, h, i0, mrows, j0, nb, st, dst, delta, keep_scale);
          block_gemm<V, true>(nb, Evp, BM, st, BM, 1, don + i0 * Evp, Evp, dv + jj * Evp, Evp);
          block_gemm<V, true>(nb, Ep, BM, dst, BM, 1, qn + i0 * Ep, Ep, dk + jj * Ep, Ep);
          block_gemm<V, true>(E, BM, nb, K + jj * E, 1, E, dst, BM, dqt + i0, Lp);
        }
      }
      // dQ of this head from this key range
      if (nparts == 1) {
        In* DQ = static_cast<In*>(p.dq) + bh * L * E;
        store_transposed<T, In>(dqt, Lp, L, E, nullptr, scale, DQ, E);
      } else {
        T* DQ = static_cast<T*>(p.dq_part) + (part * p.N * p.Hq + bh) * L * E;
        store_transposed<T, T>(dqt, Lp, L, E, nullptr, scale, DQ, E);
      }
    }
    In* DK = static_cast<In*>(p.dk) + (bhk * S + key_lo) * E;
    In* DV = static_cast<In*>(p.dv) + (bhk * S + key_lo) * Ev;
    for (int64_t j = 0; j < nk; ++j) {
      for (int64_t e = 0; e < E; ++e) DK[j * E + e] = static_cast<In>(dk[j * Ep + e] * scale);
      for (int64_t e = 0; e < Ev; ++e) DV[j * Ev + e] = static_cast<In>(dv[j * Evp + e]);
    }
  }
}

#ifndef FA_HELPERS_ONLY
// Entry points of this instruction set.
inline void fwd_f32(const AttnParams& p, int64_t b, int64_t e) { fwd_tasks<VecF, float>(p, b, e); }
inline void fwd_f64(const AttnParams& p, int64_t b, int64_t e) { fwd_tasks<VecD, double>(p, b, e); }
inline void fwd_bf16(const AttnParams& p, int64_t b, int64_t e) { fwd_tasks<VecF, c10::BFloat16>(p, b, e); }
inline void fwd_f16(const AttnParams& p, int64_t b, int64_t e) { fwd_tasks<VecF, c10::Half>(p, b, e); }
inline void bwd_f32(const AttnParams& p, int64_t b, int64_t e) { bwd_tasks<VecF, float>(p, b, e); }
inline void bwd_f64(const AttnParams& p, int64_t b, int64_t e) { bwd_tasks<VecD, double>(p, b, e); }
inline void bwd_bf16(const AttnParams& p, int64_t b, int64_t e) { bwd_tasks<VecF, c10::BFloat16>(p, b, e); }
inline void bwd_f16(const AttnParams& p, int64_t b, int64_t e) { bwd_tasks<VecF, c10::Half>(p, b, e); }
inline int lanes_f32() { return VecF::W; }
#endif  // FA_HELPERS_ONLY
