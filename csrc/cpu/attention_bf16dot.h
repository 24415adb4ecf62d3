// bfloat16 forward on CPUs with AVX512_BF16: both block GEMMs through vdpbf16ps (two bf16 products
// summed into each float32 lane per instruction), the online softmax in float32 as everywhere else.
//
// Included by csrc/cpu/attention.cpp after attention_kernel.h (FA_HELPERS_ONLY, FA_VEC_AVX512), in
// its own namespace under a target that adds avx512bf16, and chosen only when the CPU has it.
// Operands are bf16 PAIRS along the reduction dimension, one pair per 32-bit lane:
//   S^T = K Q^T : A = K rows (pairs of e, straight from memory when E is even), B = Q^T packed as
//                 qv[e/2][i] = (q[i][e], q[i][e+1]);
//   O^T += V^T P^T : A = vp[j/2][ev] = (v[j][ev], v[j+1][ev]), B = pb[j/2][i] = (p[j][i], p[j+1][i])
//                 with P rounded to bf16 (as torch's own bf16 flash attention does).

inline uint32_t bf16_bits(c10::BFloat16 x) { return x.x; }

// C[y][x] = alpha * sum_zp dot2(A[y*ay + zp*az], B[zp*ldb + x])  (+ C when ACC); x < XV*16.
template <int YR, int XV, bool ACC>
inline void dp_tile(int64_t Z2, const uint32_t* A, int64_t ay, int64_t az, const uint32_t* B, int64_t ldb,
                    float* C, int64_t ldc, float alpha) {
  __m512 c[YR][XV];
#pragma GCC unroll 16
  for (int y = 0; y < YR; ++y)
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) c[y][x] = ACC ? _mm512_loadu_ps(C + y * ldc + x * 16) : _mm512_setzero_ps();
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
  const __m512 al = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
  for (int y = 0; y < YR; ++y)
#pragma GCC unroll 4
    for (int x = 0; x < XV; ++x) _mm512_storeu_ps(C + y * ldc + x * 16, ACC ? c[y][x] : _mm512_mul_ps(c[y][x], al));
}

template <bool ACC>
inline void dp_gemm(int64_t Y, int64_t X, int64_t Z2, const uint32_t* A, int64_t ay, int64_t az, const uint32_t* B,
                    int64_t ldb, float* C, int64_t ldc, float alpha) {
  // X is a multiple of 64 here (BM): 4 vectors across, up to 6 rows down
  for (int64_t x0 = 0; x0 < X; x0 += 64) {
    const int64_t tiles = (Y + 5) / 6;
    const int64_t yr_even = tiles > 0 ? (Y + tiles - 1) / tiles : 0;
    for (int64_t y0 = 0; y0 < Y; y0 += yr_even) {
      const int yr = static_cast<int>(Y - y0 < yr_even ? Y - y0 : yr_even);
      const uint32_t* a = A + y0 * ay;
      const uint32_t* b = B + x0;
      float* c = C + y0 * ldc + x0;
      switch (yr) {
        case 6: dp_tile<6, 4, ACC>(Z2, a, ay, az, b, ldb, c, ldc, alpha); break;
        case 5: dp_tile<5, 4, ACC>(Z2, a, ay, az, b, ldb, c, ldc, alpha); break;
        case 4: dp_tile<4, 4, ACC>(Z2, a, ay, az, b, ldb, c, ldc, alpha); break;
        case 3: dp_tile<3, 4, ACC>(Z2, a, ay, az, b, ldb, c, ldc, alpha); break;
        case 2: dp_tile<2, 4, ACC>(Z2, a, ay, az, b, ldb, c, ldc, alpha); break;
        default: dp_tile<1, 4, ACC>(Z2, a, ay, az, b, ldb, c, ldc, alpha); break;
      }
    }
  }
}

// Forward tasks as fwd_tasks<VecF, c10::BFloat16>; requires p.bm % 64 == 0.
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
  std::vector<T> fbuf((BN + 1) * BM + Ev * BM + 3 * BM);
  std::vector<uint32_t> ubuf(E2 * BM + BN * E2 + BN2 * BM + BN2 * Ev);
  T* st = fbuf.data();     // (BN + 1, BM)  scores, then probabilities, transposed (+ a pad row)
  T* ot = st + (BN + 1) * BM;  // (Ev, BM)
  T* mrow = ot + Ev * BM;  // (BM)
  T* lrow = mrow + BM;
  T* arow = lrow + BM;
  uint32_t* qv = ubuf.data();     // (E2, BM)  Q^T in pairs of e
  uint32_t* kp = qv + E2 * BM;    // (BN, E2)  K block in pairs of e (odd E only)
  uint32_t* pb = kp + BN * E2;    // (BN2, BM) P^T in pairs of keys
  uint32_t* vp = pb + BN2 * BM;   // (BN2, Ev) V block in pairs of keys
  const T keep_scale = p.dropout_p > 0 ? T(1) / (T(1) - T(p.dropout_p)) : T(1);
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t qb = task % nqb, bh = task / nqb, h = bh % p.Hq, b = bh / p.Hq;
    const int64_t i0 = qb * BM, mrows = std::min(BM, L - i0);
    const In* Q = static_cast<const In*>(p.q) + (bh * L + i0) * E;
    const int64_t bhk = b * p.Hkv + h / group;
    const In* K = static_cast<const In*>(p.k) + bhk * S * E;
    const In* Vm = static_cast<const In*>(p.v) + bhk * S * Ev;
    for (int64_t zp = 0; zp < E2; ++zp) {
      const int64_t e = 2 * zp;
      for (int64_t i = 0; i < mrows; ++i) {
        const uint32_t lo = bf16_bits(Q[i * E + e]);
        const uint32_t hi = e + 1 < E ? bf16_bits(Q[i * E + e + 1]) : 0u;
        qv[zp * BM + i] = lo | (hi << 16);
      }
      for (int64_t i = mrows; i < BM; ++i) qv[zp * BM + i] = 0u;
    }
    std::fill(ot, ot + Ev * BM, T(0));
    std::fill(mrow, mrow + BM, kNegInf);
    std::fill(lrow, lrow + BM, T(0));
    const int64_t kend = p.causal ? std::min(S, i0 + mrows) : S;
    for (int64_t j0 = 0; j0 < kend; j0 += BN) {
      const int64_t nb = std::min(BN, kend - j0), nb2 = (nb + 1) / 2;
      if (keys_all_padded(p, b, j0, nb)) continue;
      const uint32_t* ka;
      if (E % 2 == 0) {
        ka = reinterpret_cast<const uint32_t*>(K + j0 * E);
      } else {
        for (int64_t j = 0; j < nb; ++j) {
          const uint16_t* row = reinterpret_cast<const uint16_t*>(K + (j0 + j) * E);
          for (int64_t zp = 0; zp < E2; ++zp) {
            const uint32_t lo = row[2 * zp];
            const uint32_t hi = 2 * zp + 1 < E ? row[2 * zp + 1] : 0u;
            kp[j * E2 + zp] = lo | (hi << 16);
          }
        }
        ka = kp;
      }
      dp_gemm<false>(nb, BM, E2, ka, E2, 1, qv, BM, st, BM, static_cast<float>(p.scale));
      mask_tile<T, In>(p, b, h, i0, mrows, j0, nb, st, BM);
      for (int64_t x = 0; x < BM; x += W) {
        V mb = V::load(mrow + x);
        const V mold = mb;
        for (int64_t j = 0; j < nb; ++j) mb = vmax(mb, V::load(st + j * BM + x));
        mb.store(mrow + x);
        const V msafe = vmax(V::set1(std::numeric_limits<T>::lowest()), mb);  // a NaN max stays NaN
        const V alpha = vexp(mold - msafe);
        alpha.store(arow + x);
        V sum = V::set1(0);
        for (int64_t j = 0; j < nb; ++j) {
          const V pj = vexp(V::load(st + j * BM + x) - msafe);
          pj.store(st + j * BM + x);
          sum = sum + pj;
        }
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
      if (nb % 2 == 1) std::fill(st + nb * BM, st + (nb + 1) * BM, T(0));  // pad the last pair
      for (int64_t jp = 0; jp < nb2; ++jp)
        for (int64_t x = 0; x < BM; x += W) {
          const __m512 r0 = _mm512_loadu_ps(st + (2 * jp) * BM + x);
          const __m512 r1 = _mm512_loadu_ps(st + (2 * jp + 1) * BM + x);
          const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(r1, r0);  // [r0 as bf16 | r1 as bf16]
          _mm512_storeu_si512(pb + jp * BM + x, _mm512_permutexvar_epi16(interleave, both));
        }
      for (int64_t jp = 0; jp < nb2; ++jp) {
        const uint16_t* r0 = reinterpret_cast<const uint16_t*>(Vm + (j0 + 2 * jp) * Ev);
        uint32_t* dst = vp + jp * Ev;
        if (2 * jp + 1 < nb) {
          const uint16_t* r1 = r0 + Ev;
          for (int64_t e = 0; e < Ev; ++e) dst[e] = static_cast<uint32_t>(r0[e]) | (static_cast<uint32_t>(r1[e]) << 16);
        } else {
          for (int64_t e = 0; e < Ev; ++e) dst[e] = static_cast<uint32_t>(r0[e]);
        }
      }
      for (int64_t e = 0; e < Ev; ++e)
        for (int64_t x = 0; x < BM; x += W) (V::load(ot + e * BM + x) * V::load(arow + x)).store(ot + e * BM + x);
      dp_gemm<true>(Ev, BM, nb2, vp, 1, Ev, pb, BM, ot, BM, 1.0f);
    }
    In* O = static_cast<In*>(p.out) + (bh * L + i0) * Ev;
    float* lse = p.lse + bh * L + i0;
    for (int64_t i = 0; i < mrows; ++i) {
      const T l = lrow[i];
      const T inv = l != T(0) ? T(1) / l : T(0);
      for (int64_t e = 0; e < Ev; ++e) O[i * Ev + e] = static_cast<In>(ot[e * BM + i] * inv);
      lse[i] = l != T(0) ? static_cast<float>(mrow[i] + std::log(l)) : std::numeric_limits<float>::infinity();
    }
  }
}
