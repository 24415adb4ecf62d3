// The CPU decoding kernel: few query rows (L <= 16) against many keys. See attention_decode.cpp.
//
// NO include guard on purpose: attention_decode.cpp includes this file once per instruction set,
// each time in its own namespace under a matching `#pragma GCC target(...)`, after defining
// FA_DEC_AVX512 (or nothing for the portable build). Plain C++ on raw pointers plus <immintrin.h>.
//
// One task = (batch b, kv head hk, chunk c of keys). Its rows are the R = group * L query rows of
// the GQA group that reads kv head hk (row r = g * L + i: head hk * group + g, query i), so each K/V
// row of the chunk is read once for the whole group. The chunk is walked in spans of p.span keys
// (a multiple of kBK, chosen from the shape), each in three phases over sub-blocks of kBK keys:
//   s (R x span) = Qs K^T  (Qs = Q * scale)   one row against 16 keys at a time: 16 accumulators
//                                             over the head dim, summed across lanes in a tree
//   masks, then one online-softmax step per row over the span   (running max m, sum l, rescale alpha)
//   o (R x Ev) = o * alpha + P V              register tiles of up to 4 rows x 8 vectors
// (bf16 K/V on AVX512_BF16 builds: the same phases on vdpbf16ps, see FA_DEC_BF16DOT below)
// so K is read as one stream, then V, instead of switching every kBK keys;
// and the task writes its (o, m, l); a second pass combines the chunks of each row in chunk order.
// Chunks have a fixed length (shape-only), so results do not depend on the number of threads.

constexpr int64_t kBK = 64;  // keys per sub-block of a span (a multiple of 16): the unit of skipping and converting

inline int64_t dec_round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The widest P V register tile (in 16-float vectors) for rt rows: rt x XV accumulators, a row of V and
// a broadcast fit the 32 zmm registers (rows come in tiles of at most 4).
constexpr int pv_max_xv(int rt) { return rt <= 2 ? 8 : 4; }

// A software-prefetch stream over the rows of a K or V block: rows are ld bytes apart, each `bytes`
// long; row j's prefetch touches row j + dist (rows counted from the block's first row), when that
// row is below lim (the chunk's end), one touch every `step` bytes of it (64: every line; 4096, the
// default: one line per page of a packed stream, enough to start the next page's TLB walk and
// memory stream early while the hardware prefetcher fetches the rest). p == nullptr: no prefetch.
// (The helpers are always_inline: GCC deems an out-of-line function of prefetches alone pure and
// drops the call.)
struct DecRows {  // the first lim rows of a stream: rows ld bytes apart, each `bytes` long (p == nullptr: none)
  const char* p = nullptr;
  int64_t ld = 0, bytes = 0, lim = 0;
};
struct DecPf {
  const char* p = nullptr;
  int64_t ld = 0, bytes = 0, dist = 0, lim = 0, step = 4096;
  int hint = 1;  // __builtin_prefetch locality: 3 = prefetcht0 (L1), 2 = t1, 1 = t2, 0 = nta
  // the stream read next: rows past lim continue into its first rows, so its start is on its way
  // before it is read
  DecRows next;
};

// Touches bytes [a, a + bytes) every `step` bytes, from a's 64-byte line on.
__attribute__((always_inline)) inline void dec_prefetch_span(const char* a, int64_t bytes, int64_t step, int hint) {
  const int64_t n = bytes + (reinterpret_cast<uintptr_t>(a) & 63);
  a -= reinterpret_cast<uintptr_t>(a) & 63;
  if (hint == 3) {  // the locality must be a compile-time constant: one loop each
    for (int64_t x = 0; x < n; x += step) __builtin_prefetch(a + x, 0, 3);
  } else if (hint == 2) {
    for (int64_t x = 0; x < n; x += step) __builtin_prefetch(a + x, 0, 2);
  } else if (hint == 1) {
    for (int64_t x = 0; x < n; x += step) __builtin_prefetch(a + x, 0, 1);
  } else {
    for (int64_t x = 0; x < n; x += step) __builtin_prefetch(a + x, 0, 0);
  }
}

// Rows [r0, r1) of the rows at p (ld bytes apart, `bytes` long each).
__attribute__((always_inline)) inline void dec_prefetch_rows(const char* p, int64_t ld, int64_t bytes, int64_t r0,
                                                             int64_t r1, int64_t step, int hint) {
  if (r0 >= r1) return;
  if (ld == bytes) {  // packed rows: one span
    dec_prefetch_span(p + r0 * ld, (r1 - r0) * ld, step, hint);
  } else {
    for (int64_t r = r0; r < r1; ++r) dec_prefetch_span(p + r * ld, bytes, step, hint);
  }
}

__attribute__((always_inline)) inline void dec_prefetch(const DecPf& s, int64_t j, int64_t n) {
  if (s.p == nullptr) return;
  const int64_t r0 = j + s.dist;
  dec_prefetch_rows(s.p, s.ld, s.bytes, r0, std::min(s.lim, r0 + n), s.step, s.hint);
  if (s.next.p != nullptr && r0 + n > s.lim)  // past the end: the next stream's first rows
    dec_prefetch_rows(s.next.p, s.next.ld, s.next.bytes, std::max(r0, s.lim) - s.lim,
                      std::min(s.next.lim, r0 + n - s.lim), s.step, s.hint);
}

// ------------------------------------------------------------------------------------------------
// Portable primitives (any T, any ISA): used for float64 everywhere and for every dtype on CPUs
// without AVX-512. The compiler vectorises the axpy loops for the enclosing target.

// s[r * lds + j] = sum_e qs[r * ldq + e] * K[j * ldk + e] for r < R, j < nk.
template <typename T>
inline void qk_generic(const T* qs, int64_t R, int64_t ldq, const T* K, int64_t ldk, int64_t E, int64_t nk,
                       T* s, int64_t lds) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < nk; ++j) {
      const T* a = qs + r * ldq;
      const T* k = K + j * ldk;
      T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
      int64_t e = 0;
      for (; e + 8 <= E; e += 8)
        for (int u = 0; u < 8; ++u) acc[u] += a[e + u] * k[e + u];
      T tail = 0;
      for (; e < E; ++e) tail += a[e] * k[e];
      s[r * lds + j] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
    }
}

// o[r * ldo + e] = o[r * ldo + e] * alpha[r] + sum_j pr[r * ldp + j] * V[j * ldv + e].
template <typename T>
inline void pv_generic(const T* pr, int64_t R, int64_t ldp, const T* V, int64_t ldv, int64_t Ev, int64_t nk, T* o,
                       int64_t ldo, const T* alpha) {
  for (int64_t r = 0; r < R; ++r) {
    T* orow = o + r * ldo;
    const T a = alpha[r];
    for (int64_t e = 0; e < Ev; ++e) orow[e] *= a;
    for (int64_t j = 0; j < nk; ++j) {
      const T w = pr[r * ldp + j];
      const T* vrow = V + j * ldv;
      for (int64_t e = 0; e < Ev; ++e) orow[e] += w * vrow[e];
    }
  }
}

// One online-softmax step of row s[0..nk): m, l updated, s turned into exp(s - m_new), returns
// alpha = exp(m_old - m_new) (0 while the row has seen only -inf).
template <typename T>
inline T softmax_step_generic(T* s, int64_t nk, T& m, T& l) {
  T mx = m;
  for (int64_t j = 0; j < nk; ++j) mx = s[j] > mx ? s[j] : mx;
  // a row that has seen only -inf keeps max -inf; subtracting the lowest finite value instead
  // makes its probabilities and its rescale factor exact zeros, never NaN
  const T sh = mx < std::numeric_limits<T>::lowest() ? std::numeric_limits<T>::lowest() : mx;  // a NaN max stays NaN
  const T alpha = std::exp(m - sh);
  T sum = 0;
  for (int64_t j = 0; j < nk; ++j) {
    s[j] = std::exp(s[j] - sh);
    sum += s[j];
  }
  l = l * alpha + sum;
  m = mx;
  return alpha;
}

// ------------------------------------------------------------------------------------------------
#if defined(FA_DEC_AVX512)

// exp(x) for x <= 0 (or -inf -> 0): 2^(x log2 e) as 2^n 2^f, f in [-1/2, 1/2] by vreduceps,
// 2^f by a degree-5 fit (relative error ~3e-7), 2^n by vscalefps (underflows to 0).
inline __m512 dec_exp_neg(__m512 xin) {
  __m512 x = _mm512_mul_ps(xin, _mm512_set1_ps(1.4426950408889634f));
  x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);  // max_ps returns its second operand on NaN: NaN stays NaN
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 n = _mm512_sub_ps(x, f);
  __m512 p = _mm512_set1_ps(1.3260914711281657e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.670180268585682e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5507123470306396e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402222454547882e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470036506653e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

inline __mmask16 dec_tail_mask(int64_t n) {  // the low n lanes (n in 1..16)
  return static_cast<__mmask16>(n >= 16 ? 0xFFFFu : ((1u << n) - 1u));
}

// Lane j of the result = the sum of the 16 lanes of a[j]: a transposing tree of 30 shuffles and
// 15 additions.
__attribute__((always_inline)) inline __m512 hsum16x16(const __m512 a[16]) {
  __m512 t[8], u[4];
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: keys 4k..4k+3, partial over that lane's elements
    u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 v0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
  const __m512 v1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x88), _mm512_shuffle_f32x4(v0, v1, 0xDD));
}

// Scores of one query row (qs, E floats) against 16 keys (rows of K, stride ldk): lane j = q . k_j.
// kRowOrder: the loads walk key by key (each row's lines in turn, one sequential stream); else
// column by column (the 16 rows' first 64 bytes, then their next 64 bytes, ...).
template <bool kRowOrder>
inline __m512 qk_row16(const float* qs, const float* K, int64_t ldk, int64_t E) {
  __m512 acc[16];
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
  const int64_t Ef = E / 16 * 16;
  const __mmask16 m = dec_tail_mask(E - Ef);
  if constexpr (kRowOrder) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      for (int64_t e = 0; e < Ef; e += 16)
        acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(qs + e), _mm512_loadu_ps(K + j * ldk + e), acc[j]);
      if (Ef < E)
        acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qs + Ef), _mm512_maskz_loadu_ps(m, K + j * ldk + Ef), acc[j]);
    }
  } else {
    for (int64_t e = 0; e < Ef; e += 16) {
      const __m512 qv = _mm512_loadu_ps(qs + e);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(K + j * ldk + e), acc[j]);
    }
    if (Ef < E) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, qs + Ef);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, K + j * ldk + Ef), acc[j]);
    }
  }
  return hsum16x16(acc);
}

// qk_row16 for a head dim of NV whole vectors (E = 16 NV), known at compile time: the query row in
// registers, each key's partial sums started by a product (the same numbers as qk_row16's).
template <bool kRowOrder, int NV>
__attribute__((always_inline)) inline __m512 qk_row16_n(const float* qs, const float* K, int64_t ldk) {
  __m512 q[NV], acc[16];
#pragma GCC unroll 8
  for (int x = 0; x < NV; ++x) q[x] = _mm512_loadu_ps(qs + 16 * x);
  if constexpr (kRowOrder) {
    // one pointer stepped key by key (opaque to the compiler, which would otherwise keep the 16 x NV
    // addresses as loop invariants and spill them)
    const float* kr = K;
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) {
      acc[j] = _mm512_mul_ps(q[0], _mm512_loadu_ps(kr));
#pragma GCC unroll 8
      for (int x = 1; x < NV; ++x) acc[j] = _mm512_fmadd_ps(q[x], _mm512_loadu_ps(kr + 16 * x), acc[j]);
      kr += ldk;
      asm("" : "+r"(kr));
    }
  } else {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_mul_ps(q[0], _mm512_loadu_ps(K + j * ldk));
#pragma GCC unroll 8
    for (int x = 1; x < NV; ++x)
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(q[x], _mm512_loadu_ps(K + j * ldk + 16 * x), acc[j]);
  }
  return hsum16x16(acc);
}

// One key: q . k as a horizontal sum (the < 16 keys at a chunk's end).
inline float qk_row1(const float* qs, const float* k, int64_t E) {
  __m512 acc = _mm512_setzero_ps();
  int64_t e = 0;
  for (; e + 16 <= E; e += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qs + e), _mm512_loadu_ps(k + e), acc);
  if (e < E) {
    const __mmask16 m = dec_tail_mask(E - e);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qs + e), _mm512_maskz_loadu_ps(m, k + e), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// s[r * lds + j] = qs[r] . K[j] for r < R, j < nk. Groups of 16 keys outer, rows inner: a group
// of K (16 x E floats) stays in L1 while every row of the GQA group reads it. NV > 0: E = 16 NV
// (compile-time); 0: any E. pf: the K rows prefetched ahead, a group at a time.
template <int NV>
inline void qk_block(const float* qs, int64_t R, int64_t ldq, const float* K, int64_t ldk, int64_t E, int64_t nk,
                     float* s, int64_t lds, bool row_order, const DecPf& pf) {
  int64_t j0 = 0;
  for (; j0 + 16 <= nk; j0 += 16) {
    dec_prefetch(pf, j0, 16);
    const float* Kj = K + j0 * ldk;
    // the first row fetches the 16 keys (in the chosen order); the group's other rows find them in L1
    if constexpr (NV > 0) {
      _mm512_storeu_ps(s + j0, row_order ? qk_row16_n<true, NV>(qs, Kj, ldk) : qk_row16_n<false, NV>(qs, Kj, ldk));
      for (int64_t r = 1; r < R; ++r) _mm512_storeu_ps(s + r * lds + j0, qk_row16_n<false, NV>(qs + r * ldq, Kj, ldk));
    } else {
      _mm512_storeu_ps(s + j0, row_order ? qk_row16<true>(qs, Kj, ldk, E) : qk_row16<false>(qs, Kj, ldk, E));
      for (int64_t r = 1; r < R; ++r) _mm512_storeu_ps(s + r * lds + j0, qk_row16<false>(qs + r * ldq, Kj, ldk, E));
    }
  }
  for (; j0 < nk; ++j0) {
    dec_prefetch(pf, j0, 1);
    for (int64_t r = 0; r < R; ++r) s[r * lds + j0] = qk_row1(qs + r * ldq, K + j0 * ldk, E);
  }
}

inline void qk_avx512(const float* qs, int64_t R, int64_t ldq, const float* K, int64_t ldk, int64_t E, int64_t nk,
                      float* s, int64_t lds, bool row_order, const DecPf& pf) {
  switch (E % 16 == 0 ? E / 16 : 0) {
    case 1: qk_block<1>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    case 2: qk_block<2>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    case 3: qk_block<3>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    case 4: qk_block<4>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    case 5: qk_block<5>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    case 6: qk_block<6>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    case 7: qk_block<7>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    case 8: qk_block<8>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
    default: qk_block<0>(qs, R, ldq, K, ldk, E, nk, s, lds, row_order, pf); break;
  }
}

// o[RT rows][XV vectors] = o * alpha + sum_j p[r][j] V[j], the last vector's lanes limited by vmask.
// One row: two accumulator sets (even and odd keys, summed at the end), so the FMA latency chains
// are not the bound. pf (or nullptr): the V rows prefetched ahead, 16 keys at a time.
template <int RT, int XV>
inline void pv_tile(const float* pr, int64_t ldp, const float* V, int64_t ldv, int64_t nk, float* o, int64_t ldo,
                    const float* alpha, __mmask16 vmask, const DecPf* pf) {
  constexpr int kSets = RT == 1 ? 2 : 1;
  __m512 acc[kSets][RT][XV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 8
    for (int x = 0; x < XV; ++x) {
      acc[0][r][x] = _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + 16 * x), a);
      if constexpr (kSets > 1) acc[kSets - 1][r][x] = _mm512_setzero_ps();
    }
  }
  const auto step = [&](int64_t j, __m512 (&ac)[RT][XV]) __attribute__((always_inline)) {
    __m512 vv[XV];
#pragma GCC unroll 8
    for (int x = 0; x < XV; ++x)
      vv[x] = x == XV - 1 ? _mm512_maskz_loadu_ps(vmask, V + j * ldv + 16 * x) : _mm512_loadu_ps(V + j * ldv + 16 * x);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      const __m512 w = _mm512_set1_ps(pr[r * ldp + j]);
#pragma GCC unroll 8
      for (int x = 0; x < XV; ++x) ac[r][x] = _mm512_fmadd_ps(w, vv[x], ac[r][x]);
    }
  };
  int64_t j = 0;
  for (; j + kSets <= nk; j += kSets) {
    if (pf != nullptr && (j & 15) == 0) dec_prefetch(*pf, j, 16);
#pragma GCC unroll 2
    for (int u = 0; u < kSets; ++u) step(j + u, acc[u]);
  }
  for (; j < nk; ++j) {
    if (pf != nullptr && (j & 15) == 0) dec_prefetch(*pf, j, 16);
    step(j, acc[0]);
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < XV; ++x)
      _mm512_storeu_ps(o + r * ldo + 16 * x, kSets > 1 ? _mm512_add_ps(acc[0][r][x], acc[kSets - 1][r][x]) : acc[0][r][x]);
}


// pv_tile<RT, xv> for a run-time xv in 1..pv_max_xv(RT).
template <int RT, int X = 1>
inline void pv_rows(int xv, const float* pr, int64_t ldp, const float* V, int64_t ldv, int64_t nk, float* o,
                    int64_t ldo, const float* alpha, __mmask16 vmask, const DecPf* pf) {
  if constexpr (X <= pv_max_xv(RT)) {
    if (xv == X)
      pv_tile<RT, X>(pr, ldp, V, ldv, nk, o, ldo, alpha, vmask, pf);
    else
      pv_rows<RT, X + 1>(xv, pr, ldp, V, ldv, nk, o, ldo, alpha, vmask, pf);
  }
}

// The register tiles of an (R rows x nvec vectors) output: row tiles of up to 4 rows (balanced),
// column tiles of up to 8 vectors for 1-2 rows and 4 vectors for 3-4 rows, so accumulators, a row of V
// and a broadcast fit the 32 registers and no tile row is wasted; fn(r0, rt, x0, xv) for each.
template <typename Fn>
__attribute__((always_inline)) inline void pv_tiles(int64_t R, int64_t nvec, Fn&& fn) {
  const int64_t rtiles = (R + 3) / 4;
  const int64_t rt_even = (R + rtiles - 1) / rtiles;
  for (int64_t r0 = 0; r0 < R; r0 += rt_even) {
    const int rt = static_cast<int>(std::min(rt_even, R - r0));
    const int maxv = pv_max_xv(rt);
    const int64_t vtiles = (nvec + maxv - 1) / maxv;
    const int64_t v_even = (nvec + vtiles - 1) / vtiles;
    for (int64_t x0 = 0; x0 < nvec; x0 += v_even) fn(r0, rt, x0, static_cast<int>(std::min(v_even, nvec - x0)));
  }
}

// o (R x Ev, stride ldo, padded to a multiple of 16 floats) = o * alpha + P V, tile by tile (pv_tiles).
inline void pv_avx512(const float* pr, int64_t R, int64_t ldp, const float* V, int64_t ldv, int64_t Ev, int64_t nk,
                      float* o, int64_t ldo, const float* alpha, const DecPf& pf) {
  pv_tiles(R, (Ev + 15) / 16, [&](int64_t r0, int rt, int64_t x0, int xv) {
    const int64_t last_cols = std::min<int64_t>(16, Ev - (x0 + xv - 1) * 16);
    const __mmask16 vmask = dec_tail_mask(last_cols);
    const float* pp = pr + r0 * ldp;
    const float* vp = V + x0 * 16;
    float* op = o + r0 * ldo + x0 * 16;
    const float* ap = alpha + r0;
    const DecPf* tp = r0 == 0 && x0 == 0 && pf.p != nullptr ? &pf : nullptr;  // the first tile prefetches
    switch (rt) {
      case 1: pv_rows<1>(xv, pp, ldp, vp, ldv, nk, op, ldo, ap, vmask, tp); break;
      case 2: pv_rows<2>(xv, pp, ldp, vp, ldv, nk, op, ldo, ap, vmask, tp); break;
      case 3: pv_rows<3>(xv, pp, ldp, vp, ldv, nk, op, ldo, ap, vmask, tp); break;
      default: pv_rows<4>(xv, pp, ldp, vp, ldv, nk, op, ldo, ap, vmask, tp); break;
    }
  });
}

// The online-softmax step of one row on s[0..nk) (s padded with -inf up to a multiple of 16).
inline float softmax_step_avx512(float* s, int64_t nk, float& m, float& l) {
  const int64_t nv = (nk + 15) / 16;
  __m512 mx = _mm512_set1_ps(m);
  for (int64_t x = 0; x < nv; ++x) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + 16 * x));
  const float mnew = _mm512_reduce_max_ps(mx);
  const float sh = mnew < std::numeric_limits<float>::lowest() ? std::numeric_limits<float>::lowest() : mnew;  // NaN stays NaN
  const __m512 vsh = _mm512_set1_ps(sh);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t x = 0; x < nv; ++x) {
    const __m512 pv = dec_exp_neg(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * x), vsh));
    _mm512_storeu_ps(s + 16 * x, pv);
    sum = _mm512_add_ps(sum, pv);
  }
  const float alpha = std::exp(m - sh);
  l = l * alpha + _mm512_reduce_add_ps(sum);
  m = mnew;
  return alpha;
}

// n values of In starting at src, as floats into dst (the n..round16(n) tail zero).
template <typename In>
inline void dec_convert_row(const In* src, int64_t n, float* dst) {
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 m = dec_tail_mask(n - e);
    const __m256i h = _mm256_maskz_loadu_epi16(m, reinterpret_cast<const uint16_t*>(src) + e);
    if constexpr (std::is_same<In, c10::BFloat16>::value) {
      _mm512_storeu_ps(dst + e, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    } else {
      _mm512_storeu_ps(dst + e, _mm512_cvtph_ps(h));
    }
  }
}
#endif  // FA_DEC_AVX512

#if defined(FA_DEC_BF16DOT)
// ------------------------------------------------------------------------------------------------
// bfloat16 K/V read in place with vdpbf16ps (AVX512_BF16: two bf16 products summed into each fp32
// lane, exact products, fp32 sums). Q K^T: the query rows are kept in bf16 as given (q is bf16, so
// nothing is rounded) and the scale is applied to the fp32 scores. P V: each sub-block's P is rounded
// to bf16 and V's rows are interleaved in key pairs ((v_j[e], v_j+1[e]) in one 32-bit lane), so one
// vdpbf16ps adds two keys' terms to 16 outputs.

// Scores of one bf16 query row (qb, NV2 * 32 values, zero padded) against 16 keys (bf16 rows of K,
// stride ldk, E values each; the last chunk masked by km): lane j = q . k_j.
template <int NV2>
__attribute__((always_inline)) inline __m512 qk_row16_bf(const uint16_t* qb, const uint16_t* K, int64_t ldk,
                                                         __mmask32 km) {
  __m512i q[NV2];
  __m512 acc[16];
#pragma GCC unroll 4
  for (int x = 0; x < NV2; ++x) q[x] = _mm512_loadu_si512(qb + 32 * x);
  const uint16_t* kr = K;
#pragma GCC unroll 16
  for (int j = 0; j < 16; ++j) {
    acc[j] = _mm512_setzero_ps();
#pragma GCC unroll 4
    for (int x = 0; x < NV2; ++x) {
      const __m512i kv = x == NV2 - 1 ? _mm512_maskz_loadu_epi16(km, kr + 32 * x) : _mm512_loadu_si512(kr + 32 * x);
      acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)q[x], (__m512bh)kv);
    }
    kr += ldk;
    asm("" : "+r"(kr));
  }
  return hsum16x16(acc);
}

// One key: q . k (the < 16 keys at a sub-block's end).
inline float qk_row1_bf(const uint16_t* qb, const uint16_t* k, int64_t E) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t e = 0; e < E; e += 32) {
    const __mmask32 m = E - e >= 32 ? 0xFFFFFFFFu : ((1u << (E - e)) - 1u);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qb + e), (__m512bh)_mm512_maskz_loadu_epi16(m, k + e));
  }
  return _mm512_reduce_add_ps(acc);
}

// s[r * lds + j] = scale * (qb[r] . K[j]) for r < R, j < nk (qb rows ldq apart, Eq = round_up(E, 32)
// values, zero padded). Groups of 16 keys outer, rows inner (the group stays in L1).
template <int NV2>
inline void qk_bf_block(const uint16_t* qb, int64_t R, int64_t ldq, const uint16_t* K, int64_t ldk, int64_t E,
                        int64_t nk, float* s, int64_t lds, float scale, const DecPf& pf) {
  const __mmask32 km = E % 32 == 0 ? 0xFFFFFFFFu : ((1u << (E % 32)) - 1u);
  const __m512 vs = _mm512_set1_ps(scale);
  int64_t j0 = 0;
  for (; j0 + 16 <= nk; j0 += 16) {
    dec_prefetch(pf, j0, 16);
    const uint16_t* Kj = K + j0 * ldk;
    for (int64_t r = 0; r < R; ++r)
      _mm512_storeu_ps(s + r * lds + j0, _mm512_mul_ps(qk_row16_bf<NV2>(qb + r * ldq, Kj, ldk, km), vs));
  }
  for (; j0 < nk; ++j0) {
    dec_prefetch(pf, j0, 1);
    for (int64_t r = 0; r < R; ++r) s[r * lds + j0] = qk_row1_bf(qb + r * ldq, K + j0 * ldk, E) * scale;
  }
}

inline void qk_bf16dot(const uint16_t* qb, int64_t R, int64_t ldq, const uint16_t* K, int64_t ldk, int64_t E,
                       int64_t nk, float* s, int64_t lds, float scale, const DecPf& pf) {
  switch ((E + 31) / 32) {
    case 1: qk_bf_block<1>(qb, R, ldq, K, ldk, E, nk, s, lds, scale, pf); break;
    case 2: qk_bf_block<2>(qb, R, ldq, K, ldk, E, nk, s, lds, scale, pf); break;
    case 3: qk_bf_block<3>(qb, R, ldq, K, ldk, E, nk, s, lds, scale, pf); break;
    case 4: qk_bf_block<4>(qb, R, ldq, K, ldk, E, nk, s, lds, scale, pf); break;
    default: {  // E > 128: key by key (qk_row1_bf, 32 values per vdpbf16ps)
      for (int64_t j = 0; j < nk; ++j) {
        dec_prefetch(pf, j, 1);
        for (int64_t r = 0; r < R; ++r) s[r * lds + j] = qk_row1_bf(qb + r * ldq, K + j * ldk, E) * scale;
      }
    }
  }
}

// V rows [0, nk) (bf16, ldv apart, Ev values) as key pairs: out[(jp * Evp + e) * 2 + t] = V[2 jp + t][e]
// (zero past Ev and for the missing partner of an odd last key); Evp a multiple of 16.
inline void dec_pair_rows(const uint16_t* V, int64_t ldv, int64_t nk, int64_t Ev, int64_t Evp, uint16_t* out) {
  for (int64_t j = 0; j < nk; j += 2) {
    const uint16_t* v0 = V + j * ldv;
    const uint16_t* v1 = j + 1 < nk ? V + (j + 1) * ldv : nullptr;
    uint16_t* o = out + (j / 2) * Evp * 2;
    for (int64_t e = 0; e < Evp; e += 16) {
      const __mmask16 m = e < Ev ? dec_tail_mask(Ev - e) : 0;
      const __m512i a = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, v0 + e));
      const __m512i b = v1 != nullptr ? _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, v1 + e)) : _mm512_setzero_si512();
      _mm512_storeu_si512(o + 2 * e, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
    }
  }
}

// P rows [0, R) of sc (fp32, lds apart), keys [0, nk2) (nk2 even), rounded to bf16 into pb (ldpb apart).
inline void dec_p_bf16(const float* sc, int64_t R, int64_t lds, int64_t nk2, uint16_t* pb, int64_t ldpb) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < nk2; j += 32) {
      const int64_t n = std::min<int64_t>(32, nk2 - j);
      const __m512 lo = _mm512_maskz_loadu_ps(dec_tail_mask(std::min<int64_t>(16, n)), sc + r * lds + j);
      const __m512 hi = n > 16 ? _mm512_maskz_loadu_ps(dec_tail_mask(n - 16), sc + r * lds + j + 16) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // [lo as bf16 | hi as bf16]
      _mm512_mask_storeu_epi16(pb + r * ldpb + j, n >= 32 ? 0xFFFFFFFFu : ((1u << n) - 1u), both);
    }
}

// o[RT rows][XV vectors] = o * alpha + sum over key pairs of P V: pairs from pb (bf16, ldpb apart per
// row, two keys per 32-bit word) and vp (dec_pair_rows' layout, Evp outputs per pair).
template <int RT, int XV>
inline void pv_tile_bf(const uint16_t* pb, int64_t ldpb, const uint16_t* vp, int64_t Evp, int64_t npairs, float* o,
                       int64_t ldo, const float* alpha) {
  __m512 acc[RT][XV];
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r) {
    const __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 8
    for (int x = 0; x < XV; ++x) acc[r][x] = _mm512_mul_ps(_mm512_loadu_ps(o + r * ldo + 16 * x), a);
  }
  for (int64_t jp = 0; jp < npairs; ++jp) {
    __m512i b[XV];
#pragma GCC unroll 8
    for (int x = 0; x < XV; ++x) b[x] = _mm512_loadu_si512(vp + (jp * Evp + 16 * x) * 2);
#pragma GCC unroll 4
    for (int r = 0; r < RT; ++r) {
      int32_t w;
      std::memcpy(&w, pb + r * ldpb + 2 * jp, sizeof(w));
      const __m512i a = _mm512_set1_epi32(w);
#pragma GCC unroll 8
      for (int x = 0; x < XV; ++x) acc[r][x] = _mm512_dpbf16_ps(acc[r][x], (__m512bh)a, (__m512bh)b[x]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < RT; ++r)
#pragma GCC unroll 8
    for (int x = 0; x < XV; ++x) _mm512_storeu_ps(o + r * ldo + 16 * x, acc[r][x]);
}

template <int RT, int X = 1>
inline void pv_rows_bf(int xv, const uint16_t* pb, int64_t ldpb, const uint16_t* vp, int64_t Evp, int64_t npairs,
                       float* o, int64_t ldo, const float* alpha) {
  if constexpr (X <= pv_max_xv(RT)) {
    if (xv == X)
      pv_tile_bf<RT, X>(pb, ldpb, vp, Evp, npairs, o, ldo, alpha);
    else
      pv_rows_bf<RT, X + 1>(xv, pb, ldpb, vp, Evp, npairs, o, ldo, alpha);
  }
}

// o (R x Evp floats, ldo apart) = o * alpha + P V over npairs key pairs, tile by tile (pv_tiles).
inline void pv_bf16dot(const uint16_t* pb, int64_t R, int64_t ldpb, const uint16_t* vp, int64_t Evp, int64_t npairs,
                       float* o, int64_t ldo, const float* alpha) {
  pv_tiles(R, Evp / 16, [&](int64_t r0, int rt, int64_t x0, int xv) {
    const uint16_t* pp = pb + r0 * ldpb;
    const uint16_t* vv = vp + x0 * 16 * 2;
    float* op = o + r0 * ldo + x0 * 16;
    const float* ap = alpha + r0;
    switch (rt) {
      case 1: pv_rows_bf<1>(xv, pp, ldpb, vv, Evp, npairs, op, ldo, ap); break;
      case 2: pv_rows_bf<2>(xv, pp, ldpb, vv, Evp, npairs, op, ldo, ap); break;
      case 3: pv_rows_bf<3>(xv, pp, ldpb, vv, Evp, npairs, op, ldo, ap); break;
      default: pv_rows_bf<4>(xv, pp, ldpb, vv, Evp, npairs, op, ldo, ap); break;
    }
  });
}
#endif  // FA_DEC_BF16DOT

// Rows [j0, j0 + nk) of X (rows of n values, ldx apart) as T, with their stride in ld: read in place
// when In is T, else converted into buf (rows of np >= n values).
template <typename T, typename In, bool kWide>
inline const T* rows_as(const In* X, int64_t ldx, int64_t j0, int64_t nk, int64_t n, int64_t np, T* buf,
                        int64_t& ld) {
  if constexpr (std::is_same<T, In>::value) {
    ld = ldx;
    return X + j0 * ldx;
  } else {
    ld = np;
#if defined(FA_DEC_AVX512)
    if constexpr (kWide) {
      for (int64_t j = 0; j < nk; ++j) dec_convert_row<In>(X + (j0 + j) * ldx, n, buf + j * np);
      return buf;
    }
#endif
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t e = 0; e < n; ++e) buf[j * np + e] = static_cast<T>(X[(j0 + j) * ldx + e]);
    return buf;
  }
}

// ------------------------------------------------------------------------------------------------
// The task loop, written once: T the compute type, In the storage type; kWide selects the AVX-512
// primitives (T = float only).

template <typename T, typename In, bool kWide>
void decode_tasks(const DecodeParams& p, int64_t task_begin, int64_t task_end) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  constexpr bool kConvert = !std::is_same<T, In>::value;
  const int64_t E = p.E, Ev = p.Ev, L = p.L, S = p.S, group = p.Hq / p.Hkv, R = group * L;
  const int64_t Ep = dec_round_up(E, 16), Evp = dec_round_up(Ev, 16);
  const int64_t span = p.span;  // keys per softmax step (a multiple of kBK)
  std::vector<T> buf(R * Ep + R * span + R * Evp + 4 * R + (kConvert ? kBK * (Ep + Evp) : 0));
  T* qs = buf.data();       // (R, Ep)   query rows times scale, zero padded
  T* sc = qs + R * Ep;      // (R, span) scores, then probabilities
  T* ob = sc + R * span;    // (R, Evp)  unnormalised output
  T* mrow = ob + R * Evp;   // (R)       running max
  T* lrow = mrow + R;       // (R)       running sum
  T* arow = lrow + R;       // (R)       rescale factor of this span
  T* ones = arow + R;       // (R)       1: the rescale of a span's later sub-blocks
  T* kbuf = ones + R;       // (kBK, Ep), (kBK, Evp): the K and V sub-blocks in T when In is narrower
  T* vbuf = kConvert ? kbuf + kBK * Ep : nullptr;
  std::fill(ones, ones + R, T(1));
  // P V in one register tile (pv_tiles): the span's V is then read in one pass; with several tiles each
  // 64-key sub-block is walked by every tile while in L1
  const bool one_tile = R <= 4 && Evp / 16 <= pv_max_xv(static_cast<int>(R));
  std::vector<char> skip_buf(span / kBK);
  char* skip = skip_buf.data();
#if defined(FA_DEC_BF16DOT)
  // bf16 K/V on vdpbf16ps (FA_DEC_BF16DOT builds): q rows in bf16 (Eq values, zero padded), a
  // sub-block's P in bf16 and its V rows in key pairs
  constexpr bool kDot = std::is_same<In, c10::BFloat16>::value;
#else
  constexpr bool kDot = false;
#endif
  const int64_t Eq = dec_round_up(E, 32);
  std::vector<uint16_t> dot_buf(kDot ? R * Eq + R * kBK + kBK * Evp : 0);
  uint16_t* qb = dot_buf.data();
  uint16_t* pb = kDot ? qb + R * Eq : nullptr;
  [[maybe_unused]] uint16_t* vpair = kDot ? pb + R * kBK : nullptr;
  const T scale = static_cast<T>(p.scale);
  const T keep_scale = p.dropout_p > 0 ? T(1) / (T(1) - T(p.dropout_p)) : T(1);
  constexpr int64_t isz = sizeof(In);
  constexpr bool kInPlace = kWide && !kConvert;  // the float micro-kernels read K and V in place and prefetch
  constexpr bool kInKernel = kInPlace || kDot;     // the Q K^T micro-kernels prefetch K as they go
  // the prefetch distances in rows: p.prefetch_bytes ahead, at least one row (0: off)
  const int64_t pf_k = p.prefetch_bytes > 0 ? std::max<int64_t>(1, (p.prefetch_bytes + E * isz - 1) / (E * isz)) : 0;
  const int64_t pf_v = p.prefetch_bytes > 0 ? std::max<int64_t>(1, (p.prefetch_bytes + Ev * isz - 1) / (Ev * isz)) : 0;
  // tasks [task_begin, task_end), last to first when p.reverse
  for (int64_t it = task_begin; it < task_end; ++it) {
    const int64_t task = p.reverse ? task_begin + task_end - 1 - it : it;
    const int64_t c = task % p.nchunks, bhk = task / p.nchunks, b = bhk / p.Hkv, hk = bhk % p.Hkv;
    const int64_t j_lo = c * p.chunk, j_hi = std::min(p.kend, j_lo + p.chunk);
    const In* K = static_cast<const In*>(p.k) + b * p.ksb + hk * p.ksh;  // key j's row at K + j * p.kss
    const In* Vm = static_cast<const In*>(p.v) + b * p.vsb + hk * p.vsh;
    for (int64_t r = 0; r < R; ++r) {
      const In* Q = static_cast<const In*>(p.q) + b * p.qsb + (hk * group + r / L) * p.qsh + (r % L) * p.qsl;
      for (int64_t e = 0; e < E; ++e) qs[r * Ep + e] = static_cast<T>(Q[e]) * scale;
      for (int64_t e = E; e < Ep; ++e) qs[r * Ep + e] = T(0);
      if constexpr (kDot) {
        std::memcpy(qb + r * Eq, Q, E * sizeof(uint16_t));
        std::fill(qb + r * Eq + E, qb + (r + 1) * Eq, uint16_t(0));
      }
    }
    std::fill(ob, ob + R * Evp, T(0));
    std::fill(mrow, mrow + R, kNegInf);
    std::fill(lrow, lrow + R, T(0));
    const bool* kpm = p.kpm != nullptr ? p.kpm + b * S : nullptr;
    for (int64_t s0 = j_lo; s0 < j_hi; s0 += span) {
      const int64_t ns = std::min(span, j_hi - s0), nsub = (ns + kBK - 1) / kBK;
      // sub-blocks whose keys are all padded are skipped (no K or V read); their scores are -inf
      int live = 0;
      for (int64_t u = 0; u < nsub; ++u) {
        const int64_t j0 = s0 + u * kBK, nk = std::min(kBK, j_hi - j0);
        const bool all = kpm != nullptr && dec_all_padded(kpm, j0, j0 + nk);
        skip[u] = all;
        live += all ? 0 : 1;
      }
      if (live == 0) continue;
      // phase 1: the scores of the whole span (reads K only)
      for (int64_t u = 0; u < nsub; ++u) {
        const int64_t j0 = s0 + u * kBK, nk = std::min(kBK, j_hi - j0);
        if (skip[u]) {
          for (int64_t r = 0; r < R; ++r) std::fill(sc + r * span + u * kBK, sc + r * span + u * kBK + nk, kNegInf);
          continue;
        }
        // software prefetch of the K rows pf_k rows ahead up to the span's end, then on into the
        // span's first V rows: by the in-place kernels as they go, else here for the whole sub-block
        DecPf pfk;
        if (pf_k > 0) {
          pfk = DecPf{reinterpret_cast<const char*>(K + j0 * p.kss), p.kss * isz, E * isz, pf_k, s0 + ns - j0,
                      p.prefetch_step, p.prefetch_hint,
                      DecRows{reinterpret_cast<const char*>(Vm + s0 * p.vss), p.vss * isz, Ev * isz, ns}};
          if (!kInKernel) dec_prefetch(pfk, 0, nk);
        }
#if defined(FA_DEC_BF16DOT)
        if constexpr (kDot) {
          qk_bf16dot(qb, R, Eq, reinterpret_cast<const uint16_t*>(K + j0 * p.kss), p.kss, E, nk, sc + u * kBK, span,
                     static_cast<float>(scale), pfk);
          continue;
        }
#endif
        int64_t ldk;
        const T* Kb = rows_as<T, In, kWide>(K, p.kss, j0, nk, E, Ep, kbuf, ldk);
#if defined(FA_DEC_AVX512)
        if constexpr (kWide)
          qk_avx512(qs, R, Ep, Kb, ldk, E, nk, sc + u * kBK, span, p.qk_row_order, kInPlace ? pfk : DecPf{});
        else
#endif
          qk_generic<T>(qs, R, Ep, Kb, ldk, E, nk, sc + u * kBK, span);
      }
      // phase 2: masks and one online-softmax step per row over the span
      const int64_t ns16 = dec_round_up(ns, 16);
      for (int64_t r = 0; r < R; ++r) {
        T* s = sc + r * span;
        const int64_t g = r / L, i = r % L, h = hk * group + g;
        for (int64_t j = ns; j < ns16; ++j) s[j] = kNegInf;
        if (p.mask != nullptr) {
          // float32 (float64 for float64 q); only -inf excludes a key: set, not added
          const T* mrow_p = static_cast<const T*>(p.mask) + b * p.msb + h * p.msh + i * p.msl + s0 * p.mss;
          for (int64_t j = 0; j < ns; ++j) {
            const T mv = mrow_p[j * p.mss];
            s[j] = mv == kNegInf ? kNegInf : s[j] + mv;
          }
        }
        if (p.causal)  // top-left: query i sees key j iff j <= i
          for (int64_t j = std::max<int64_t>(0, i + 1 - s0); j < ns; ++j) s[j] = kNegInf;
        if (kpm != nullptr)
          for (int64_t j = 0; j < ns; ++j)
            if (kpm[s0 + j]) s[j] = kNegInf;
#if defined(FA_DEC_AVX512)
        if constexpr (kWide)
          arow[r] = softmax_step_avx512(s, ns, mrow[r], lrow[r]);
        else
#endif
          arow[r] = softmax_step_generic<T>(s, ns, mrow[r], lrow[r]);
        if (p.dropout_p > 0) {
          const uint64_t off = static_cast<uint64_t>(((b * p.Hq + h) * L + i) * S + s0);
          for (int64_t j = 0; j < ns; ++j) {
            const bool keep = fastattn::philox_uniform(p.seed, off + j) >= p.dropout_p;
            s[j] = keep ? s[j] * keep_scale : T(0);
          }
        }
      }
      // phase 3: o = o * alpha + P V over the span's live sub-blocks (reads V only); the first
      // applies the rescale, the others add. Past the span's last V row the prefetch runs on into
      // the K rows read next: the next span's, or the next task's first
      const auto next_k = [&]() -> DecRows {
        if (s0 + ns < j_hi)
          return DecRows{reinterpret_cast<const char*>(K + (s0 + ns) * p.kss), p.kss * isz, E * isz,
                         std::min(span, j_hi - (s0 + ns))};
        if (it + 1 >= task_end) return DecRows{};
        const int64_t nt = p.reverse ? task - 1 : task + 1;
        const int64_t nc = nt % p.nchunks, nbh = nt / p.nchunks;
        return DecRows{reinterpret_cast<const char*>(static_cast<const In*>(p.k) + (nbh / p.Hkv) * p.ksb +
                                                     (nbh % p.Hkv) * p.ksh + nc * p.chunk * p.kss),
                       p.kss * isz, E * isz, std::min(span, std::min(p.kend, (nc + 1) * p.chunk) - nc * p.chunk)};
      };
      const T* alpha = arow;
      if (kInPlace && one_tile && live == nsub) {  // one register tile: one pass over the whole span
        DecPf pfv;
        if (pf_v > 0) {
          pfv = DecPf{reinterpret_cast<const char*>(Vm + s0 * p.vss), p.vss * isz, Ev * isz, pf_v, ns,
                      p.prefetch_step, p.prefetch_hint, next_k()};
        }
#if defined(FA_DEC_AVX512)
        if constexpr (kInPlace)
          pv_avx512(sc, R, span, reinterpret_cast<const T*>(Vm + s0 * p.vss), p.vss, Ev, ns, ob, Evp, alpha, pfv);
#endif
        continue;
      }
      for (int64_t u = 0; u < nsub; ++u) {
        if (skip[u]) continue;
        const int64_t j0 = s0 + u * kBK, nk = std::min(kBK, j_hi - j0);
        DecPf pfv;
        if (pf_v > 0) {
          pfv = DecPf{reinterpret_cast<const char*>(Vm + j0 * p.vss), p.vss * isz, Ev * isz, pf_v, s0 + ns - j0,
                      p.prefetch_step, p.prefetch_hint, next_k()};
          if (!kInPlace) dec_prefetch(pfv, 0, nk);
        }
#if defined(FA_DEC_BF16DOT)
        if constexpr (kDot) {
          const int64_t nk2 = dec_round_up(nk, 2);
          dec_pair_rows(reinterpret_cast<const uint16_t*>(Vm + j0 * p.vss), p.vss, nk, Ev, Evp, vpair);
          dec_p_bf16(sc + u * kBK, R, span, nk2, pb, kBK);
          pv_bf16dot(pb, R, kBK, vpair, Evp, nk2 / 2, ob, Evp, alpha);
          alpha = ones;
          continue;
        }
#endif
        int64_t ldv;
        const T* Vb = rows_as<T, In, kWide>(Vm, p.vss, j0, nk, Ev, Evp, vbuf, ldv);
#if defined(FA_DEC_AVX512)
        if constexpr (kWide)
          pv_avx512(sc + u * kBK, R, span, Vb, ldv, Ev, nk, ob, Evp, alpha, kInPlace ? pfv : DecPf{});
        else
#endif
          pv_generic<T>(sc + u * kBK, R, span, Vb, ldv, Ev, nk, ob, Evp, alpha);
        alpha = ones;
      }
    }
    // this chunk's (o, m, l) -- or, when the chunk is the whole row, the finished row
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = r / L, i = r % L, row = (b * p.Hq + hk * group + g) * L + i;
      const T* orow = ob + r * Evp;
      if (p.nchunks == 1) {
        const T l = lrow[r];
        const T inv = l != T(0) ? T(1) / l : T(0);  // a row that saw no key: out 0, lse +inf
        In* O = static_cast<In*>(p.out) + b * p.osb + (hk * group + g) * p.osh + i * p.osl;
        for (int64_t e = 0; e < Ev; ++e) O[e] = static_cast<In>(orow[e] * inv);
        p.lse[row] = l != T(0) ? static_cast<float>(mrow[r] + std::log(l)) : std::numeric_limits<float>::infinity();
      } else {
        const int64_t prow = c * p.rows + row;
        T* part = static_cast<T*>(p.o_part) + prow * Ev;
        T* ml = static_cast<T*>(p.ml_part) + 2 * prow;
        ml[0] = mrow[r];
        ml[1] = lrow[r];
        if (lrow[r] != T(0)) std::copy(orow, orow + Ev, part);  // NaN sums too
      }
    }
  }
}

// Combines the chunks of rows [row_begin, row_end) (rows of (N, Hq, L)) in chunk order.
template <typename T, typename In>
void decode_combine(const DecodeParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t Ev = p.Ev, nc = p.nchunks;
  std::vector<T> acc(Ev);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* ml = static_cast<const T*>(p.ml_part);
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < nc; ++c) {
      const T* x = ml + 2 * (c * p.rows + row);
      if (x[1] != T(0) && x[0] > mx) mx = x[0];
    }
    std::fill(acc.begin(), acc.end(), T(0));
    T l = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const T* x = ml + 2 * (c * p.rows + row);
      if (x[1] == T(0)) continue;  // a chunk that saw no key (a NaN sum takes part)
      const T w = std::exp(x[0] - mx);
      l += x[1] * w;
      const T* part = static_cast<const T*>(p.o_part) + (c * p.rows + row) * Ev;
      for (int64_t e = 0; e < Ev; ++e) acc[e] += part[e] * w;
    }
    const T inv = l != T(0) ? T(1) / l : T(0);
    const int64_t i = row % p.L, h = (row / p.L) % p.Hq, b = row / (p.L * p.Hq);
    In* O = static_cast<In*>(p.out) + b * p.osb + h * p.osh + i * p.osl;
    for (int64_t e = 0; e < Ev; ++e) O[e] = static_cast<In>(acc[e] * inv);
    p.lse[row] = l != T(0) ? static_cast<float>(mx + std::log(l)) : std::numeric_limits<float>::infinity();
  }
}

// Entry points of this instruction set.
#if defined(FA_DEC_AVX512)
#define FA_DEC_WIDE true
#else
#define FA_DEC_WIDE false
#endif
inline void dec_f32(const DecodeParams& p, int64_t b, int64_t e) { decode_tasks<float, float, FA_DEC_WIDE>(p, b, e); }
inline void dec_bf16(const DecodeParams& p, int64_t b, int64_t e) {
  decode_tasks<float, c10::BFloat16, FA_DEC_WIDE>(p, b, e);
}
inline void dec_f16(const DecodeParams& p, int64_t b, int64_t e) { decode_tasks<float, c10::Half, FA_DEC_WIDE>(p, b, e); }
inline void dec_f64(const DecodeParams& p, int64_t b, int64_t e) { decode_tasks<double, double, false>(p, b, e); }
inline void comb_f32(const DecodeParams& p, int64_t b, int64_t e) { decode_combine<float, float>(p, b, e); }
inline void comb_bf16(const DecodeParams& p, int64_t b, int64_t e) { decode_combine<float, c10::BFloat16>(p, b, e); }
inline void comb_f16(const DecodeParams& p, int64_t b, int64_t e) { decode_combine<float, c10::Half>(p, b, e); }
inline void comb_f64(const DecodeParams& p, int64_t b, int64_t e) { decode_combine<double, double>(p, b, e); }
#undef FA_DEC_WIDE
