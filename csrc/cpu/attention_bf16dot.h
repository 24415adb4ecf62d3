// bfloat16 attention, forward and backward, on CPUs with AVX512_BF16 (vdpbf16ps: two bf16 products
// summed into each float32 lane per instruction, twice the float32 FMA's work per instruction). Used
// where the CPU has avx512_bf16 but no AMX (the AMX path, attention_amx.cpp, is tried first), unless
// FASTATTN_CPU_BF16DOT=0; csrc/cpu/bf16dot.h holds the choice and the call counters.
//
// Included by csrc/cpu/attention.cpp after attention_kernel.h (FA_HELPERS_ONLY, FA_VEC_AVX512), in
// its own namespace under a target that adds avx512bf16. Same layout as the float32 kernels (score
// tiles transposed, st[j][i], one vector spans 16 queries), every block GEMM of one form
//     C[y][x..x+16) (+)= sum_zp dot2(A[y*ay + zp*az], B[zp*ldb + x..x+16))
// where an A element is a 32-bit PAIR of bf16 along the reduction (broadcast), a B row holds 16
// such pairs. The operands and where their pairs come from:
//   forward   S^T  = K Q^T     A = K rows (pairs of e: K itself when E is even)   B = Q^T pairs (qv)
//             O^T += V^T P^T   A = V rows interleaved by key pairs (vp)         B = P^T rows interleaved (pb)
//   backward  S^T  = K Q^T     as above                                         B = qv
//             dP^T = V dO^T    A = V rows (pairs of ev)                           B = dO^T pairs (dov)
//             dV  += P^T dO    A = P^T rows in bf16 (pairs of queries)            B = dO rows interleaved (doi)
//             dK  += dS^T Q    A = dS^T rows in bf16                              B = Q rows interleaved (qi)
//             dQ^T += K^T dS^T A = K rows interleaved (kt)                        B = dS^T rows interleaved
// P and dS are rounded to bf16 for the GEMMs that take them (as torch's bf16 flash attention does);
// scores, softmax, running max/sum and every accumulator stay float32. The softmax scale is applied
// to the float32 scores (Q is not rounded again after scaling).

// ------------------------------------------------------------------------------------------------
// The dot-product block GEMM. Epilogues as block_gemm's (attention_kernel.h), plus alpha: a non-ACC
// result is alpha * (A B) before the epilogue (the softmax scale).

template <int YR, int XV, bool ACC, int EP>
inline void dp_tile(int64_t Z2, const uint32_t* A, int64_t ay, int64_t az, const uint32_t* B, int64_t ldb,
                    float* C, int64_t ldc, float alpha, float* aux, const float* aux2) {
  __m512 c[YR][XV];
#pragma GCC unroll 16
  for (int y = 0; y < YR; ++y)
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      if constexpr (ACC && EP == kScaleC)
        c[y][x] = _mm512_mul_ps(_mm512_loadu_ps(C + y * ldc + x * 16), _mm512_loadu_ps(aux + x * 16));
      else
        c[y][x] = ACC ? _mm512_loadu_ps(C + y * ldc + x * 16) : _mm512_setzero_ps();
    }
  for (int64_t z = 0; z < Z2; ++z) {
    __m512bh b[XV];
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) b[x] = (__m512bh)_mm512_loadu_si512(B + z * ldb + x * 16);
    const uint32_t* a = A + z * az;
#pragma GCC unroll 16
    for (int y = 0; y < YR; ++y) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[y * ay]));
#pragma GCC unroll 4
      for (int x = 0; x < XV; ++x) c[y][x] = _mm512_dpbf16_ps(c[y][x], av, b[x]);
    }
  }
  if constexpr (!ACC) {
    const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
    for (int y = 0; y < YR; ++y)
#pragma GCC unroll 4
      for (int x = 0; x < XV; ++x) c[y][x] = _mm512_mul_ps(c[y][x], al);
  }
  if constexpr (EP == kExp) {
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      const VecF sh = VecF::load(aux + x * 16);
#pragma GCC unroll 16
      for (int y = 0; y < YR; ++y) c[y][x] = vexp_sub(VecF{c[y][x]}, sh).v;
    }
  }
  if constexpr (EP == kDs) {
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      const __m512 d = _mm512_loadu_ps(aux + x * 16);
#pragma GCC unroll 16
      for (int y = 0; y < YR; ++y)
        c[y][x] = _mm512_mul_ps(_mm512_loadu_ps(aux2 + y * ldc + x * 16), _mm512_sub_ps(c[y][x], d));
    }
  }
#pragma GCC unroll 16
  for (int y = 0; y < YR; ++y)
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) _mm512_storeu_ps(C + y * ldc + x * 16, c[y][x]);
  if constexpr (EP == kColMax) {
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) {
      __m512 m = _mm512_loadu_ps(aux + x * 16);
#pragma GCC unroll 16
      for (int y = 0; y < YR; ++y) m = _mm512_max_ps(m, c[y][x]);
      _mm512_storeu_ps(aux + x * 16, m);
    }
  }
}

// rows of one register tile: XV * rows accumulators + XV B vectors + a broadcast fit 32 registers
constexpr int dp_max_rows(int xv) { return xv >= 4 ? 6 : 8; }

template <int XV, bool ACC, int EP>
inline void dp_rows(int yr, int64_t Z2, const uint32_t* A, int64_t ay, int64_t az, const uint32_t* B, int64_t ldb,
                    float* C, int64_t ldc, float alpha, float* aux, const float* aux2) {
#define FA_DP_CASE(R)                                                             \
  case R:                                                                         \
    if constexpr (R <= dp_max_rows(XV)) {                                         \
      dp_tile<R, XV, ACC, EP>(Z2, A, ay, az, B, ldb, C, ldc, alpha, aux, aux2);   \
      return;                                                                     \
    }                                                                             \
    break;
  switch (yr) {
    FA_DP_CASE(1) FA_DP_CASE(2) FA_DP_CASE(3) FA_DP_CASE(4) FA_DP_CASE(5) FA_DP_CASE(6)
    FA_DP_CASE(7) FA_DP_CASE(8)
    default: break;
  }
#undef FA_DP_CASE
}

// C (Y x X) (+)= A (Y x Z2 pairs, strides ay, az) B (Z2 pairs x X, row stride ldb); X a multiple of 16.
template <bool ACC, int EP = kStore>
inline void dp_gemm(int64_t Y, int64_t X, int64_t Z2, const uint32_t* A, int64_t ay, int64_t az, const uint32_t* B,
                    int64_t ldb, float* C, int64_t ldc, float alpha = 1.f, float* aux = nullptr,
                    const float* aux2 = nullptr) {
  walk_tiles(
      Y, X, 16, A, ay, B, C, ldc, aux, aux2,
      [](int64_t left) { return static_cast<int>(left >= 4 ? 4 : left >= 2 ? 2 : 1); },  // 3 = 2 + 1
      [](int xv) { return dp_max_rows(xv); },
      [&](int xv, int yr, const uint32_t* a, const uint32_t* b, float* c, float* xa, const float* xa2) {
        switch (xv) {
          case 4: dp_rows<4, ACC, EP>(yr, Z2, a, ay, az, b, ldb, c, ldc, alpha, xa, xa2); break;
          case 2: dp_rows<2, ACC, EP>(yr, Z2, a, ay, az, b, ldb, c, ldc, alpha, xa, xa2); break;
          default: dp_rows<1, ACC, EP>(yr, Z2, a, ay, az, b, ldb, c, ldc, alpha, xa, xa2); break;
        }
      });
}

// ------------------------------------------------------------------------------------------------
// Packing.

// dst[x] = (bf16(r0[x]), bf16(r1[x])) for x < n (a multiple of 16); r1 null means zeros.
inline void pair_rows_f32(const float* r0, const float* r1, uint32_t* dst, int64_t n) {
  const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t x = 0; x < n; x += 16) {
    const __m512 a = _mm512_loadu_ps(r0 + x);
    const __m512 b = r1 != nullptr ? _mm512_loadu_ps(r1 + x) : _mm512_setzero_ps();
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // [a as bf16 | b as bf16]
    _mm512_storeu_si512(dst + x, _mm512_permutexvar_epi16(inter, both));
  }
}

// n floats (a multiple of 16) rounded to bf16, in order: dst holds n/2 pairs.
inline void round_row_f32(const float* src, uint32_t* dst, int64_t n) {
  int64_t x = 0;
  for (; x + 32 <= n; x += 32) {
    const __m512i r = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + x + 16), _mm512_loadu_ps(src + x));
    _mm512_storeu_si512(dst + x / 2, r);
  }
  if (x < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + x / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + x)));
}

// dst[e] = (r0[e], r1[e]) for e < n: two bf16 rows interleaved; a null row reads as zeros.
inline void pair_rows_bf16(const uint16_t* r0, const uint16_t* r1, uint32_t* dst, int64_t n) {
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                          6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  for (int64_t x = 0; x < n; x += 32) {
    const int64_t m = n - x < 32 ? n - x : 32;
    const __mmask32 lm = m == 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << m) - 1u);
    const __m512i a = r0 != nullptr ? _mm512_maskz_loadu_epi16(lm, r0 + x) : _mm512_setzero_si512();
    const __m512i b = r1 != nullptr ? _mm512_maskz_loadu_epi16(lm, r1 + x) : _mm512_setzero_si512();
    const __m512i lo = _mm512_permutex2var_epi16(a, lo_idx, b);
    const __m512i hi = _mm512_permutex2var_epi16(a, hi_idx, b);
    const int64_t m0 = m < 16 ? m : 16, m1 = m - m0;
    _mm512_mask_storeu_epi32(dst + x, static_cast<__mmask16>((1u << m0) - 1u), lo);
    if (m1 > 0) _mm512_mask_storeu_epi32(dst + x + 16, static_cast<__mmask16>((1u << m1) - 1u), hi);
  }
}

// 32-bit lanes mask of the first n (<= 16) lanes, 16-bit lanes mask of the first n (<= 32).
inline __mmask16 lanes16(int64_t n) { return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1u); }
inline __mmask32 lanes32(int64_t n) { return n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u); }

// dst[zp * ldd + r] = (src[r][2zp], src[r][2zp+1]) for r < R, zp < ceil(C/2) (an odd C's last pair
// zero-padded); rows [R, Rp) zero; Rp a multiple of 16. 16 x 16 blocks of pairs transposed in registers.
inline void pair_cols_transposed(const c10::BFloat16* src, int64_t R, int64_t Rp, int64_t C, uint32_t* dst,
                                 int64_t ldd) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  const int64_t C2 = (C + 1) / 2;
  for (int64_t r0 = 0; r0 < Rp; r0 += 16)
    for (int64_t c0 = 0; c0 < C; c0 += 32) {
      const __mmask32 m = lanes32(C - c0);
      __m512 r[16];
      for (int k = 0; k < 16; ++k)
        r[k] = r0 + k < R ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, s + (r0 + k) * C + c0))
                          : _mm512_setzero_ps();
      transpose16(r);
      const int64_t np = std::min<int64_t>(16, C2 - c0 / 2);
      for (int64_t k = 0; k < np; ++k) _mm512_storeu_ps(reinterpret_cast<float*>(dst + (c0 / 2 + k) * ldd + r0), r[k]);
    }
}

// Rows of a bf16 (n, C) matrix as pairs of columns (ld C2 = ceil(C/2), an odd C's last pair
// zero-padded): src itself when C is even.
inline const uint32_t* pair_cols(const c10::BFloat16* src, int64_t n, int64_t C, uint32_t* buf) {
  if (C % 2 == 0) return reinterpret_cast<const uint32_t*>(src);
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  const int64_t C2 = (C + 1) / 2;
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c0 = 0; c0 < C; c0 += 32) {
      const __m512i v = _mm512_maskz_loadu_epi16(lanes32(C - c0), s + j * C + c0);
      _mm512_mask_storeu_epi32(buf + j * C2 + c0 / 2, lanes16(C2 - c0 / 2), v);
    }
  return buf;
}

// dst[r * ldd + c] = bf16(src[c * lds + r] * f_r) for r < R, c < C, f_r = f[r] (or s when f is null):
// a transposed float accumulator written out row by row (O, dQ).
inline void store_transposed_bf16(const float* src, int64_t lds, int64_t R, int64_t C, const float* f, float s,
                                  c10::BFloat16* dst, int64_t ldd) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  int64_t r0 = 0;
  for (; r0 + 16 <= R; r0 += 16)
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const int64_t n = std::min<int64_t>(16, C - c0);
      __m512 r[16];
      for (int k = 0; k < 16; ++k) r[k] = k < n ? _mm512_loadu_ps(src + (c0 + k) * lds + r0) : _mm512_setzero_ps();
      transpose16(r);
      for (int k = 0; k < 16; ++k) {
        const __m512 fr = _mm512_set1_ps(f != nullptr ? f[r0 + k] : s);
        const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(r[k], fr));
        _mm256_mask_storeu_epi16(d + (r0 + k) * ldd + c0, lanes16(n), b);
      }
    }
  for (int64_t r = r0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c)
      dst[r * ldd + c] = static_cast<c10::BFloat16>(src[c * lds + r] * (f != nullptr ? f[r] : s));
}

// dst[c] = bf16(src[c] * s) for c < n (src readable up to n rounded up to 16).
inline void store_row_bf16(const float* src, float s, int64_t n, c10::BFloat16* dst) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t c = 0; c < n; c += 16) {
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(src + c), _mm512_set1_ps(s)));
    _mm256_mask_storeu_epi16(d + c, lanes16(n - c), b);
  }
}

// ------------------------------------------------------------------------------------------------
// Forward: one task = (batch b, query head h, block of BM queries), as fwd_tasks; BM % 16 == 0,
// BN even.

inline void fwd_bf16_dot(const AttnParams& p, int64_t task_begin, int64_t task_end) {
  using V = VecF;
  using T = float;
  using In = c10::BFloat16;
  constexpr int W = V::W;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const int64_t BM = p.bm, BN = p.bn, E = p.E, Ev = p.Ev, L = p.L, S = p.S;
  const int64_t E2 = (E + 1) / 2, BN2 = (BN + 1) / 2;
  const int64_t nqb = (L + BM - 1) / BM;
  const int64_t group = p.Hq / p.Hkv;
  const float scale = static_cast<float>(p.scale);
  std::vector<T> fbuf(BN * BM + Ev * BM + 3 * BM);
  std::vector<uint32_t> ubuf(E2 * BM + BN2 * BM);
  // K (odd E: in pairs of e) and V (rows interleaved by key pairs) of one (batch, kv head), packed
  // when a task of another kv head comes (consecutive tasks share one: the query blocks of a head).
  const int64_t S2 = (S + 1) / 2;
  std::vector<uint32_t> kall(E % 2 == 1 ? S * E2 : 0), vall(S2 * Ev);
  std::vector<uint32_t> vodd(BN2 * Ev);
  int64_t packed_bhk = -1;
  T* st = fbuf.data();     // (BN, BM)  scores, transposed
  T* ot = st + BN * BM;    // (Ev, BM)  unnormalised output, transposed
  T* mrow = ot + Ev * BM;  // (BM)
  T* lrow = mrow + BM;
  T* arow = lrow + BM;
  uint32_t* qv = ubuf.data();   // (E2, BM)  Q^T in pairs of e
  uint32_t* pb = qv + E2 * BM;  // (BN2, BM) P^T, rows interleaved by key pairs
  const T keep_scale = p.dropout_p > 0 ? T(1) / (T(1) - T(p.dropout_p)) : T(1);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t qb = task % nqb, bh = task / nqb, h = bh % p.Hq, b = bh / p.Hq;
    const int64_t i0 = qb * BM, mrows = std::min(BM, L - i0);
    const In* Q = static_cast<const In*>(p.q) + (bh * L + i0) * E;
    const int64_t bhk = b * p.Hkv + h / group;
    const In* K = static_cast<const In*>(p.k) + bhk * S * E;
    const uint16_t* Vm = reinterpret_cast<const uint16_t*>(static_cast<const In*>(p.v) + bhk * S * Ev);
    if (bhk != packed_bhk) {
      if (E % 2 == 1) pair_cols(K, S, E, kall.data());
      for (int64_t jp = 0; jp < S2; ++jp)
        pair_rows_bf16(Vm + 2 * jp * Ev, 2 * jp + 1 < S ? Vm + (2 * jp + 1) * Ev : nullptr, vall.data() + jp * Ev, Ev);
      packed_bhk = bhk;
    }
    const uint32_t* kpairs = E % 2 == 1 ? kall.data() : reinterpret_cast<const uint32_t*>(K);
    pair_cols_transposed(Q, mrows, BM, E, qv, BM);
    std::fill(mrow, mrow + BM, kNegInf);
    std::fill(lrow, lrow + BM, T(0));
    const int64_t kend = p.causal ? std::min(S, i0 + mrows) : S;
    bool have_out = false;
    for (int64_t j0 = 0; j0 < kend; j0 += BN) {
      const int64_t nb = std::min(BN, kend - j0), nb2 = (nb + 1) / 2;
      if (keys_all_padded(p, b, j0, nb)) continue;
      const uint32_t* ka = kpairs + j0 * E2;
      if (!tile_needs_mask(p, i0, j0, nb)) {
        std::copy(mrow, mrow + BM, arow);
        dp_gemm<false, kColMax>(nb, BM, E2, ka, E2, 1, qv, BM, st, BM, scale, mrow);
      } else {
        dp_gemm<false>(nb, BM, E2, ka, E2, 1, qv, BM, st, BM, scale);
        mask_tile<T, In>(p, b, h, i0, mrows, j0, nb, st, BM);
        col_max<V>(st, nb, BM, mrow, arow);
      }
      const bool drop = p.dropout_p > 0;
      for (int64_t x = 0; x < BM; x += W) {
        const V sh = vmax(V::set1(std::numeric_limits<T>::lowest()), V::load(mrow + x));  // a NaN max stays NaN
        const V alpha = vexp_sub(V::load(arow + x), sh);
        alpha.store(arow + x);
        V sum0 = V::set1(0), sum1 = V::set1(0);
        for (int64_t j = 0; j < nb; j += 2) {
          const V p0 = vexp_sub(V::load(st + j * BM + x), sh);
          sum0 = sum0 + p0;
          V p1 = V::set1(0);
          if (j + 1 < nb) {
            p1 = vexp_sub(V::load(st + (j + 1) * BM + x), sh);
            sum1 = sum1 + p1;
          }
          if (drop) {
            p0.store(st + j * BM + x);
            if (j + 1 < nb) p1.store(st + (j + 1) * BM + x);
          } else {
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(p1.v, p0.v);
            const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                                   23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            _mm512_storeu_si512(pb + (j / 2) * BM + x, _mm512_permutexvar_epi16(inter, both));
          }
        }
        fmadd(V::load(lrow + x), alpha, sum0 + sum1).store(lrow + x);
      }
      if (drop) {
        for (int64_t i = 0; i < mrows; ++i) {
          const uint64_t off = dropout_offset(p, b, h, i0 + i, j0);
          for (int64_t j = 0; j < nb; ++j) {
            const bool keep = fastattn::philox_uniform(p.seed, off + j) >= p.dropout_p;
            st[j * BM + i] = keep ? st[j * BM + i] * keep_scale : T(0);
          }
        }
        for (int64_t jp = 0; jp < nb2; ++jp)
          pair_rows_f32(st + 2 * jp * BM, 2 * jp + 1 < nb ? st + (2 * jp + 1) * BM : nullptr, pb + jp * BM, BM);
      }
      // V pairs of this block: keys j0 + 2jp, j0 + 2jp + 1 (j0 is even: BN is). An odd last key's
      // partner, key j0 + nb, takes no part: its half is zeroed in a copy.
      const uint32_t* vp = vall.data() + (j0 / 2) * Ev;
      if (nb % 2 == 1) {
        std::copy(vp, vp + nb2 * Ev, vodd.data());
        for (int64_t e = 0; e < Ev; ++e) vodd[(nb2 - 1) * Ev + e] &= 0xffffu;
        vp = vodd.data();
      }
      if (have_out)
        dp_gemm<true, kScaleC>(Ev, BM, nb2, vp, 1, Ev, pb, BM, ot, BM, 1.f, arow);
      else
        dp_gemm<false>(Ev, BM, nb2, vp, 1, Ev, pb, BM, ot, BM, 1.f);
      have_out = true;
    }
    if (!have_out) std::fill(ot, ot + Ev * BM, T(0));
    In* O = static_cast<In*>(p.out) + (bh * L + i0) * Ev;
    float* lse = p.lse + bh * L + i0;
    for (int64_t i = 0; i < mrows; ++i) {
      const T l = lrow[i];
      arow[i] = l != T(0) ? T(1) / l : T(0);
      lse[i] = l != T(0) ? static_cast<float>(mrow[i] + std::log(l)) : std::numeric_limits<float>::infinity();
    }
    store_transposed_bf16(ot, BM, mrows, Ev, arow, 1.f, O, Ev);
  }
}

// delta = rowsum(dO O) in T, eight independent partial sums (no serial chain of n additions). The
// fp32 kernels compute delta by the dP GEMM's own fmadd chain (attention_kernel.h) so that one-hot rows
// get dS = 0 exactly; this path keeps the plain sum (bf16 inputs: the rounding of O dominates) and hands
// heads with large logits to the float32 kernel (bwd_bf16_dot).
template <typename T, typename In>
inline T bf16_row_dot(const In* a, const In* b, int64_t n) {
  T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (int u = 0; u < 8; ++u) acc[u] += static_cast<T>(a[e + u]) * static_cast<T>(b[e + u]);
  T tail = 0;
  for (; e < n; ++e) tail += static_cast<T>(a[e]) * static_cast<T>(b[e]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// ------------------------------------------------------------------------------------------------
// Backward: one task = (batch b, kv head hk, key range), as bwd_tasks; BM % 16 == 0, BN even.

inline void bwd_bf16_dot(const AttnParams& p, int64_t task_begin, int64_t task_end) {
  using V = VecF;
  using T = float;
  using In = c10::BFloat16;
  constexpr int W = V::W;
  const int64_t BM = p.bm, BN = p.bn, E = p.E, Ev = p.Ev, L = p.L, S = p.S;
  const int64_t Lp = round_up(L, BM), Ep = round_up(E, W), Evp = round_up(Ev, W);
  const int64_t E2 = (E + 1) / 2, Ev2 = (Ev + 1) / 2, BN2 = (BN + 1) / 2, BMh = BM / 2;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t nparts = p.key_parts;
  const int64_t part_len = round_up((S + nparts - 1) / nparts, BN);
  std::vector<T> fbuf(2 * Lp + E * Lp + 2 * BN * BM + part_len * Ep + part_len * Evp);
  T* delta = fbuf.data();     // (Lp)
  T* lse = delta + Lp;        // (Lp)
  T* dqt = lse + Lp;          // (E, Lp)   dQ^T accumulator
  T* st = dqt + E * Lp;       // (BN, BM)  P^T
  T* dst = st + BN * BM;      // (BN, BM)  dP^T, then dS^T
  T* dk = dst + BN * BM;      // (part_len, Ep)
  T* dv = dk + part_len * Ep; // (part_len, Evp)
  std::vector<uint32_t> ubuf(E2 * Lp + Ev2 * Lp + (Lp / 2) * Ep + (Lp / 2) * Evp + part_len * E2 +
                             part_len * Ev2 + (part_len / 2 + 1) * E + 2 * BN * BMh + BN2 * BM);
  uint32_t* qv = ubuf.data();          // (E2, Lp)     Q^T in pairs of e
  uint32_t* dov = qv + E2 * Lp;        // (Ev2, Lp)    dO^T in pairs of ev
  uint32_t* qi = dov + Ev2 * Lp;       // (Lp/2, Ep)   Q rows interleaved by query pairs
  uint32_t* doi = qi + (Lp / 2) * Ep;  // (Lp/2, Evp)  dO rows interleaved
  uint32_t* kpb = doi + (Lp / 2) * Evp;  // (part_len, E2)  K in pairs of e (odd E)
  uint32_t* vpb = kpb + part_len * E2;   // (part_len, Ev2) V in pairs of ev (odd Ev)
  uint32_t* kt = vpb + part_len * Ev2;   // (part_len/2, E) K rows interleaved by key pairs
  uint32_t* pa = kt + (part_len / 2 + 1) * E;  // (BN, BM/2)  P^T rows in bf16
  uint32_t* dsa = pa + BN * BMh;               // (BN, BM/2)  dS^T rows in bf16
  uint32_t* dsb = dsa + BN * BMh;              // (BN2, BM)   dS^T rows interleaved by key pairs
  const T keep_scale = p.dropout_p > 0 ? T(1) / (T(1) - T(p.dropout_p)) : T(1);
  const T scale = static_cast<T>(p.scale);
  const int64_t nqb = Lp / BM;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const auto [part, bhk, b, hk, key_lo, nk] = bwd_task(p, task, part_len);
    // Large logits (some |lse| >= kSplitLse in the group): P from the rounded lse, delta from the bf16
    // output and P, dS rounded to bf16 for the products put dQ, dK off by several times torch's error
    // (issue 15 item 6); such a task runs the float32 kernel, split lse and delta = rowsum(P dP).
    bool split = false;
    for (int64_t g = 0; g < group; ++g) split |= lse_needs_split(bwd_head<In>(p, b, hk, g).LSE, L);
    if (split) {
      bwd_tasks<V, In>(p, task, task + 1);
      continue;
    }
    const In* Kin = static_cast<const In*>(p.k) + (bhk * S + key_lo) * E;
    const In* Vin = static_cast<const In*>(p.v) + (bhk * S + key_lo) * Ev;
    const uint32_t* ka = pair_cols(Kin, nk, E, kpb);
    const uint32_t* va = pair_cols(Vin, nk, Ev, vpb);
    {
      const uint16_t* k16 = reinterpret_cast<const uint16_t*>(Kin);
      for (int64_t jp = 0; jp < (nk + 1) / 2; ++jp)
        pair_rows_bf16(k16 + 2 * jp * E, 2 * jp + 1 < nk ? k16 + (2 * jp + 1) * E : nullptr, kt + jp * E, E);
    }
    std::fill(dk, dk + part_len * Ep, T(0));
    std::fill(dv, dv + part_len * Evp, T(0));
    for (int64_t g = 0; g < group && nk > 0; ++g) {
      const auto [h, bh, Q, dO, O, LSE] = bwd_head<In>(p, b, hk, g);
      pair_cols_transposed(Q, L, Lp, E, qv, Lp);
      pair_cols_transposed(dO, L, Lp, Ev, dov, Lp);
      std::fill(qi, qi + (Lp / 2) * Ep, 0u);
      std::fill(doi, doi + (Lp / 2) * Evp, 0u);
      const uint16_t* q16 = reinterpret_cast<const uint16_t*>(Q);
      const uint16_t* d16 = reinterpret_cast<const uint16_t*>(dO);
      for (int64_t ip = 0; ip < (L + 1) / 2; ++ip) {
        const bool two = 2 * ip + 1 < L;
        pair_rows_bf16(q16 + 2 * ip * E, two ? q16 + (2 * ip + 1) * E : nullptr, qi + ip * Ep, E);
        pair_rows_bf16(d16 + 2 * ip * Ev, two ? d16 + (2 * ip + 1) * Ev : nullptr, doi + ip * Evp, Ev);
      }
      for (int64_t i = 0; i < L; ++i) {
        delta[i] = bf16_row_dot<T, In>(dO + i * Ev, O + i * Ev, Ev);
        lse[i] = LSE[i];
      }
      for (int64_t i = L; i < Lp; ++i) {
        delta[i] = T(0);
        lse[i] = std::numeric_limits<T>::infinity();
      }
      std::fill(dqt, dqt + E * Lp, T(0));
      for (int64_t jj = 0; jj < nk; jj += BN) {
        const int64_t j0 = key_lo + jj, nb = std::min(BN, nk - jj), nb2 = (nb + 1) / 2;
        if (keys_all_padded(p, b, j0, nb)) continue;
        const int64_t qb0 = p.causal ? std::min(nqb, j0 / BM) : 0;
        for (int64_t qb = qb0; qb < nqb; ++qb) {
          const int64_t i0 = qb * BM, mrows = std::min(BM, L - i0);
          const bool plain = !tile_needs_mask(p, i0, j0, nb);
          if (plain) {
            dp_gemm<false, kExp>(nb, BM, E2, ka + jj * E2, E2, 1, qv + i0, Lp, st, BM, scale, lse + i0);
          } else {
            dp_gemm<false>(nb, BM, E2, ka + jj * E2, E2, 1, qv + i0, Lp, st, BM, scale);
            mask_tile<T, In>(p, b, h, i0, mrows, j0, nb, st, BM);
            for (int64_t j = 0; j < nb; ++j)
              for (int64_t x = 0; x < BM; x += W)
                vexp_sub(V::load(st + j * BM + x), V::load(lse + i0 + x)).store(st + j * BM + x);
          }
          if (plain && p.dropout_p == 0) {
            dp_gemm<false, kDs>(nb, BM, Ev2, va + jj * Ev2, Ev2, 1, dov + i0, Lp, dst, BM, 1.f, delta + i0, st);
          } else {
            dp_gemm<false>(nb, BM, Ev2, va + jj * Ev2, Ev2, 1, dov + i0, Lp, dst, BM, 1.f);
          }
          if (p.dropout_p > 0 || !plain) ds_tile<V>(p, b, h, i0, mrows, j0, nb, st, dst, delta, keep_scale);
          for (int64_t j = 0; j < nb; ++j) {
            round_row_f32(st + j * BM, pa + j * BMh, BM);
            round_row_f32(dst + j * BM, dsa + j * BMh, BM);
          }
          for (int64_t jp = 0; jp < nb2; ++jp)
            pair_rows_f32(dst + 2 * jp * BM, 2 * jp + 1 < nb ? dst + (2 * jp + 1) * BM : nullptr, dsb + jp * BM, BM);
          dp_gemm<true>(nb, Evp, BMh, pa, BMh, 1, doi + (i0 / 2) * Evp, Evp, dv + jj * Evp, Evp);
          dp_gemm<true>(nb, Ep, BMh, dsa, BMh, 1, qi + (i0 / 2) * Ep, Ep, dk + jj * Ep, Ep);
          dp_gemm<true>(E, BM, nb2, kt + (jj / 2) * E, 1, E, dsb, BM, dqt + i0, Lp);
        }
      }
      if (nparts == 1) {
        In* DQ = static_cast<In*>(p.dq) + bh * L * E;
        store_transposed_bf16(dqt, Lp, L, E, nullptr, scale, DQ, E);
      } else {
        T* DQ = static_cast<T*>(p.dq_part) + (part * p.N * p.Hq + bh) * L * E;
        store_transposed<T, T>(dqt, Lp, L, E, nullptr, scale, DQ, E);
      }
    }
    In* DK = static_cast<In*>(p.dk) + (bhk * S + key_lo) * E;
    In* DV = static_cast<In*>(p.dv) + (bhk * S + key_lo) * Ev;
    for (int64_t j = 0; j < nk; ++j) {
      store_row_bf16(dk + j * Ep, scale, E, DK + j * E);
      store_row_bf16(dv + j * Evp, 1.f, Ev, DV + j * Ev);
    }
  }
}
