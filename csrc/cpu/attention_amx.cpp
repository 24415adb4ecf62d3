// bfloat16 attention forward on AMX: the two GEMMs (S = Q K^T and O += P V) run on oneDNN's brgemm
// micro-kernel through at::native::cpublas::brgemm (bf16 x bf16 -> fp32, AMX tiles on CPUs with
// amx_bf16), the softmax in AVX-512 between them.
//
// One task = (batch b, kv head hk, range of query blocks). It packs its kv head's K and V once into
// the VNNI layout brgemm wants for B (pairs of K-dimension rows interleaved):
//   K^T (E x S):  kp[e/2][j][e%2] = K[j][e]   (a 32-bit-word transpose of K; E padded to even)
//   V   (S x Ev): vp[j/2][n][j%2] = V[j][n]   (S padded with zero rows)
// then walks the GQA group's query heads and its query blocks of BM rows. Per block, keys are
// taken in chunks of up to KC (the whole row when S <= KC, the common case: no rescaling at all):
//   s (BM x KC fp32) = Q K^T by one brgemm call; per row: mask/padding (when present), max,
//   p = 2^(s*c - m*c) summed in fp32, dropout, rounded to bf16; O (fp32) += P V by one call.
// Rows are finished as O / l in bf16 and lse = max + ln l (+inf and 0 for rows that see no key).
//
// Semantics are the kernel contract's (fastattn/backends/README.md), same as attention_kernel.h;
// dropout uses the shared Philox counter ((b*Hq + h)*L + i)*S + j. The vector code is compiled
// with __attribute__((target)) on functions of internal linkage only, and runs only after a run-time
// check of the CPU (AVX-512 BW/VL/DQ + avx512_bf16) and the AMX brgemm probe (amx_probe.h); the
// tuning knob FASTATTN_CPU_AMX=0 turns the path off. torch.ops.fastattn_amx.fwd_calls() counts the
// calls served here (for the tests).
//
// Defaults: BM = 128 queries (A/B against 32/64/96/192/256 on the bench shapes), KC = S rounded up to
// 32 when S <= 1024, else 512; the tuning knobs FASTATTN_AMX_BM and FASTATTN_AMX_KC (csrc/tuning.h)
// set them. Where the time goes (1 thread, N8 H12 L512 E64): the two brgemm calls ~45%, the softmax ~40-45%,
// packing and finishing rows ~10%.
#include "cpu/attention_amx.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/amx_probe.h"
#include "cpu/attention_common.h"
#include "cpu/vec_exp.h"
#include "philox.h"
#include "tuning.h"

#if defined(FASTATTN_AMX_BUILD)
#include <immintrin.h>
#endif

namespace fastattn {
namespace cpu_attn {
namespace amx {
namespace {

std::atomic<int64_t> g_fwd_calls{0};

#if defined(FASTATTN_AMX_BUILD)

#define FA_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,fma,f16c")))

struct Params {
  int64_t N, Hq, Hkv, L, S, E, Ev;
  int64_t Ep;   // E rounded up to even (the K dimension of Q K^T)
  int64_t Sp;   // S rounded up to a multiple of 32 (columns of packed K^T, rows of packed V)
  int64_t BM;   // queries per block
  int64_t KC;   // keys per chunk (a multiple of 32)
  // Row strides of the packed K^T (32-bit words), the score block (floats) and the probability
  // block (bf16): padded off powers of two, whose rows would all fall in a few cache sets.
  int64_t ldk, lds, ldp;
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  const float* mask;  // additive, float32
  int64_t msb, msh, msl, mss;
  const bool* kpm;
  double dropout_p;
  uint64_t seed;
  bool causal;
  float scale;
  uint16_t* out;
  float* lse;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Per-thread scratch.
struct Scratch {
  std::vector<uint32_t> kp;   // (Ep/2, Sp) 32-bit words: packed K^T
  std::vector<uint16_t> vp;   // (Sp/2, Ev, 2): packed V
  std::vector<uint16_t> qb;   // (BM, Ep): Q block padded to even E (odd E only)
  std::vector<float> s;       // (BM, KC) scores
  std::vector<uint16_t> pb;   // (BM, KC) probabilities in bf16
  std::vector<float> o;       // (BM, Ev) unnormalised output
  std::vector<float> m, l;    // (BM) running max (in the units of the row pass), sum
  std::vector<float> inv;     // (BM) 1 / l
  std::vector<float> cm;      // (BM) max of each row in the current key chunk
  std::vector<float> kb;      // (S) key padding bias, 0 or -inf
  std::vector<float> tmp;     // (16) strided mask gather
  // Software prefetch of what comes next (the next Q block, the next task's K and V): K/V come
  // cold from memory and their first reads stalled the packing; a few lines per softmax row
  // hide that behind arithmetic.
  const char* pf_ptr[3] = {nullptr, nullptr, nullptr};
  int64_t pf_lines[3] = {0, 0, 0};
  int64_t pf_per_row = 0;
  void prefetch_some() {
    int64_t budget = pf_per_row;
    for (int r = 0; r < 3 && budget > 0; ++r) {
      while (pf_lines[r] > 0 && budget > 0) {
        _mm_prefetch(pf_ptr[r], _MM_HINT_T1);
        pf_ptr[r] += 64;
        --pf_lines[r];
        --budget;
      }
    }
  }
  void set_region(int r, const void* ptr, int64_t bytes) {
    pf_ptr[r] = static_cast<const char*>(ptr);
    pf_lines[r] = ptr != nullptr ? (bytes + 63) / 64 : 0;
  }
};

// 2^x for x <= 0 (a little above 0 is fine too): cpu/vec_exp.h at degree 4 (relative error 3.6e-6:
// the probabilities are rounded to bf16 (2^-9) anyway, and lse moves by at most 4e-6). CLAMP maps
// -inf (and anything below -200) to 0; without CLAMP the caller guarantees finite x.
template <bool CLAMP>
FA_AMX_TARGET inline __m512 exp2_ps(__m512 x) {
  return cpu::exp2_avx512<4, CLAMP>(x);
}

// ln x for finite x > 0: x = mm * 2^e with mm in [0.75, 1.5), ln mm = 2 atanh(t), t = (mm-1)/(mm+1)
// in [-1/7, 1/5], odd series to t^9 (truncation 4e-9).
FA_AMX_TARGET inline __m512 log_ps(__m512 x) {
  __m512 e = _mm512_getexp_ps(x);
  __m512 mm = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_src);
  const __mmask16 big = _mm512_cmp_ps_mask(mm, _mm512_set1_ps(1.5f), _CMP_GE_OQ);
  mm = _mm512_mask_mul_ps(mm, big, mm, _mm512_set1_ps(0.5f));
  e = _mm512_mask_add_ps(e, big, e, _mm512_set1_ps(1.f));
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(mm, _mm512_set1_ps(1.f)), _mm512_add_ps(mm, _mm512_set1_ps(1.f)));
  const __m512 t2 = _mm512_mul_ps(t, t);
  __m512 r = _mm512_set1_ps(2.f / 9.f);
  r = _mm512_fmadd_ps(r, t2, _mm512_set1_ps(2.f / 7.f));
  r = _mm512_fmadd_ps(r, t2, _mm512_set1_ps(2.f / 5.f));
  r = _mm512_fmadd_ps(r, t2, _mm512_set1_ps(2.f / 3.f));
  r = _mm512_fmadd_ps(r, t2, _mm512_set1_ps(2.f));
  return _mm512_fmadd_ps(e, _mm512_set1_ps(0.6931471805599453f), _mm512_mul_ps(r, t));
}

FA_AMX_TARGET inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

FA_AMX_TARGET inline __m512 bf16x16_to_ps(__m256i x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// Packs rows [0, rows) of K (S, E) into kp (Ep/2, Sp) words and V (S, Ev) into vp (Sp/2, Ev, 2);
// rows [rows, round_up(rows, 32)) are zero.
FA_AMX_TARGET void pack_kv(const Params& p, const uint16_t* K, const uint16_t* V, int64_t rows,
                           uint32_t* kp, uint16_t* vp) {
  const int64_t E = p.E, Ev = p.Ev, Sp = p.ldk, E2 = p.Ep / 2;
  const int64_t rp = std::min(round_up(rows, 32), p.Sp);
  // K^T: word (w, j) = K[j][2w] | K[j][2w+1] << 16
  // 16 rows x 16 words at a time, transposed in registers. Word w of row j sits at 16-bit offset
  // j*E + 2w; with odd E the last word's high half belongs to the next row (masked off), so the
  // head's last row takes the scalar loop (its next row may lie past the end of the tensor).
  const bool odd = E % 2 == 1;
  int64_t j0 = 0;
  for (; j0 + 16 <= rows && (!odd || j0 + 16 < p.S); j0 += 16) {
    const uint16_t* base = K + j0 * E;
    for (int64_t w0 = 0; w0 < E2; w0 += 16) {
      const int64_t nw = std::min<int64_t>(16, E2 - w0);
      const __mmask16 km = tail_mask(nw);
      __m512i r[16], t[16];
      for (int i = 0; i < 16; ++i) {
        r[i] = _mm512_maskz_loadu_epi32(km, base + i * E + 2 * w0);
        if (odd && w0 + nw == E2)
          r[i] = _mm512_mask_and_epi32(r[i], static_cast<__mmask16>(1u << (nw - 1)), r[i], _mm512_set1_epi32(0xFFFF));
      }
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
      }
      for (int i = 0; i < 4; ++i) {  // r[4i + c], lane l: rows 4i..4i+3 of word 4l + c
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
      }
      for (int c = 0; c < 4; ++c) {
        const __m512i x0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44);
        const __m512i x1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
        const __m512i y0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        const __m512i y1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
        const __m512i col[4] = {_mm512_shuffle_i32x4(x0, y0, 0x88), _mm512_shuffle_i32x4(x0, y0, 0xDD),
                                _mm512_shuffle_i32x4(x1, y1, 0x88), _mm512_shuffle_i32x4(x1, y1, 0xDD)};
        for (int l = 0; l < 4; ++l) {
          const int64_t w = 4 * l + c;
          if (w < nw) _mm512_storeu_si512(reinterpret_cast<void*>(kp + (w0 + w) * Sp + j0), col[l]);
        }
      }
    }
  }
  for (int64_t j = j0; j < rows; ++j) {
    const uint16_t* r = K + j * E;
    for (int64_t w = 0; w < E2; ++w) {
      const uint32_t lo = r[2 * w];
      const uint32_t hi = 2 * w + 1 < E ? r[2 * w + 1] : 0u;
      kp[w * Sp + j] = lo | (hi << 16);
    }
  }
  for (int64_t w = 0; w < E2; ++w)
    for (int64_t j = rows; j < rp; ++j) kp[w * Sp + j] = 0;
  // V: row pairs interleaved
  for (int64_t j = 0; j + 1 < rows; j += 2) {
    const uint16_t* r0 = V + j * Ev;
    const uint16_t* r1 = r0 + Ev;
    uint16_t* d = vp + j * Ev;
    int64_t n = 0;
    for (; n + 16 <= Ev; n += 16) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + n));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + n));
      const __m512i a32 = _mm512_cvtepu16_epi32(a);
      const __m512i b32 = _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16);
      _mm512_storeu_si512(reinterpret_cast<void*>(d + 2 * n), _mm512_or_si512(a32, b32));
    }
    for (; n < Ev; ++n) {
      d[2 * n] = r0[n];
      d[2 * n + 1] = r1[n];
    }
  }
  if (rows % 2 == 1) {
    const uint16_t* r0 = V + (rows - 1) * Ev;
    uint16_t* d = vp + (rows - 1) * Ev;
    for (int64_t n = 0; n < Ev; ++n) {
      d[2 * n] = r0[n];
      d[2 * n + 1] = 0;
    }
  }
  const int64_t z0 = round_up(rows, 2);
  if (rp > z0) std::memset(vp + z0 * Ev, 0, sizeof(uint16_t) * (rp - z0) * Ev);
}

// The softmax of one row chunk: s (n valid scores, of npad columns), running max m (in the units
// of the row: raw q.k on the fast path, scale*q.k + mask otherwise) and sum l; writes bf16
// probabilities (dropout applied) to pb[0, npad) and returns the rescale factor for the row's
// earlier output (0 or 1 on the first chunk).
// fast: no mask, no padding, scale > 0: the row holds raw q.k and c = scale * log2(e).
// Split in two so that a block's rows run pass 1 all, then pass 2 all: no row waits on its own
// max reduction.
// Pass 1: the row's maximum (after adding scale/mask/padding in place when not fast).
template <bool fast>
FA_AMX_TARGET inline float row_max(const Params& p, float* s, int64_t n, const float* mrow, const float* kb,
                                   float* tmp) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const __m512 vneg = _mm512_set1_ps(kNegInf);
  __m512 vmax = vneg;
  if constexpr (fast) {
    int64_t j = 0;
    __m512 m1 = vneg;
    for (; j + 32 <= n; j += 32) {
      vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
      m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + j + 16));
    }
    for (; j < n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vneg, tail_mask(n - j), s + j));
    vmax = _mm512_max_ps(vmax, m1);
  } else {
    const __m512 vs = _mm512_set1_ps(p.scale);
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 km = tail_mask(n - j);
      __m512 y = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, s + j), vs);
      if (mrow != nullptr) {
        __m512 mv;
        if (p.mss == 1) {
          mv = _mm512_maskz_loadu_ps(km, mrow + j);
        } else if (p.mss == 0) {
          mv = _mm512_set1_ps(mrow[0]);
        } else {
          const int64_t cnt = std::min<int64_t>(16, n - j);
          for (int64_t t = 0; t < cnt; ++t) tmp[t] = mrow[(j + t) * p.mss];
          mv = _mm512_maskz_loadu_ps(km, tmp);
        }
        // only -inf excludes a key: set, not added (a NaN score + -inf would be NaN)
        const __mmask16 excl = _mm512_cmp_ps_mask(mv, vneg, _CMP_EQ_OQ);
        y = _mm512_mask_blend_ps(excl, _mm512_add_ps(y, mv), vneg);
      }
      if (kb != nullptr) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(km, kb + j));
      _mm512_mask_storeu_ps(s + j, km, y);
      vmax = _mm512_max_ps(vmax, _mm512_mask_blend_ps(km, vneg, y));
    }
  }
  return _mm512_reduce_max_ps(vmax);
}

// Pass 2: probabilities given the chunk's max cmax; updates m and l, returns the rescale factor.
template <bool fast>
FA_AMX_TARGET inline float row_exp(const Params& p, const float* s, int64_t n, int64_t npad, uint16_t* pb,
                                   float& m, float& l, float cmax, uint64_t drop_off) {
  const float kNegInf = -std::numeric_limits<float>::infinity();
  const float mnew = std::max(m, cmax);
  if (mnew == kNegInf) {  // nothing visible so far: probabilities 0, output untouched
    std::memset(pb, 0, sizeof(uint16_t) * npad);
    return 1.f;
  }
  const float c = fast ? p.scale * 1.4426950408889634f : 1.4426950408889634f;
  const float alpha = m == kNegInf ? 0.f : std::exp2((m - mnew) * c);
  m = mnew;
  const __m512 vc = _mm512_set1_ps(c);
  const __m512 vmc = _mm512_set1_ps(-mnew * c);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  const bool drop = p.dropout_p > 0;
  const float keep_scale = drop ? static_cast<float>(1.0 / (1.0 - p.dropout_p)) : 1.f;
  int64_t j = 0;
  if (!drop) {
    for (; j + 32 <= n; j += 32) {
      const __m512 e0 = exp2_ps<!fast>(_mm512_fmadd_ps(_mm512_loadu_ps(s + j), vc, vmc));
      const __m512 e1 = exp2_ps<!fast>(_mm512_fmadd_ps(_mm512_loadu_ps(s + j + 16), vc, vmc));
      sum0 = _mm512_add_ps(sum0, e0);
      sum1 = _mm512_add_ps(sum1, e1);
      _mm512_storeu_si512(reinterpret_cast<void*>(pb + j), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
  }
  for (; j < n; j += 16) {
    const __mmask16 km = tail_mask(n - j);
    __m512 e = exp2_ps<!fast>(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, s + j), vc, vmc));
    e = _mm512_maskz_mov_ps(km, e);
    sum0 = _mm512_add_ps(sum0, e);
    if (drop) {
      const int64_t cnt = std::min<int64_t>(16, n - j);
      uint32_t keep = 0;
      for (int64_t t = 0; t < cnt; ++t)
        keep |= static_cast<uint32_t>(fastattn::philox_uniform(p.seed, drop_off + j + t) >= p.dropout_p) << t;
      e = _mm512_maskz_mul_ps(static_cast<__mmask16>(keep), e, _mm512_set1_ps(keep_scale));
    }
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(e);
    _mm256_mask_storeu_epi16(pb + j, km, h);
  }
  if (npad > n) std::memset(pb + n, 0, sizeof(uint16_t) * (npad - n));
  l = l * alpha + _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
  return alpha;
}

// One query block: rows [i0, i0 + mrows) of head (b, h), whose kv head is packed in sc.kp / sc.vp.
FA_AMX_TARGET void fwd_block(const Params& p, Scratch& sc, int64_t b, int64_t h, int64_t i0, int64_t mrows) {
  const int64_t E = p.E, Ep = p.Ep, Ev = p.Ev, L = p.L, S = p.S, KC = p.KC, lds = p.lds, ldp = p.ldp;
  const int64_t bh = b * p.Hq + h;
  const uint16_t* Q = p.q + (bh * L + i0) * E;
  const at::BFloat16* A;
  if (E == Ep) {
    A = reinterpret_cast<const at::BFloat16*>(Q);
  } else {
    for (int64_t i = 0; i < mrows; ++i) {
      std::memcpy(sc.qb.data() + i * Ep, Q + i * E, sizeof(uint16_t) * E);
      sc.qb[i * Ep + E] = 0;
    }
    A = reinterpret_cast<const at::BFloat16*>(sc.qb.data());
  }
  const bool fast = p.mask == nullptr && p.kpm == nullptr && p.scale > 0;
  float* m = sc.m.data();
  float* l = sc.l.data();
  float* O = sc.o.data();
  for (int64_t i = 0; i < mrows; ++i) {
    m[i] = -std::numeric_limits<float>::infinity();
    l[i] = 0.f;
  }
  const int64_t kend = p.causal ? std::min(S, i0 + mrows) : S;
  const float* mbase = p.mask != nullptr ? p.mask + b * p.msb + h * p.msh + i0 * p.msl : nullptr;
  const float* kb = p.kpm != nullptr ? sc.kb.data() : nullptr;
  for (int64_t c0 = 0; c0 < kend; c0 += KC) {
    const int64_t cn = std::min(KC, kend - c0);
    const int64_t cnp = round_up(cn, 32);  // <= Sp - c0
    at::native::cpublas::brgemm(mrows, cnp, Ep, Ep, p.ldk, lds, false, A,
                                reinterpret_cast<const at::BFloat16*>(sc.kp.data()) + c0 * 2,
                                sc.s.data(), true);
    float* cm = sc.cm.data();
    for (int64_t i = 0; i < mrows; ++i) {
      const int64_t n = p.causal ? std::min<int64_t>(cn, i0 + i + 1 - c0) : cn;
      if (n <= 0) continue;
      float* srow = sc.s.data() + i * lds;
      const float* mrow = mbase != nullptr ? mbase + i * p.msl + c0 * p.mss : nullptr;
      const float* kbc = kb != nullptr ? kb + c0 : nullptr;
      cm[i] = fast ? row_max<true>(p, srow, n, mrow, kbc, sc.tmp.data())
                   : row_max<false>(p, srow, n, mrow, kbc, sc.tmp.data());
    }
    for (int64_t i = 0; i < mrows; ++i) {
      const int64_t gi = i0 + i;
      const int64_t n = p.causal ? std::min<int64_t>(cn, gi + 1 - c0) : cn;
      const float* srow = sc.s.data() + i * lds;
      uint16_t* prow = sc.pb.data() + i * ldp;
      if (n <= 0) {
        std::memset(prow, 0, sizeof(uint16_t) * cnp);
        continue;
      }
      sc.prefetch_some();
      const uint64_t drop_off = static_cast<uint64_t>((bh * L + gi) * S + c0);
      const float alpha = fast ? row_exp<true>(p, srow, n, cnp, prow, m[i], l[i], cm[i], drop_off)
                               : row_exp<false>(p, srow, n, cnp, prow, m[i], l[i], cm[i], drop_off);
      if (c0 > 0 && alpha != 1.f) {
        float* orow = O + i * Ev;
        const __m512 va = _mm512_set1_ps(alpha);
        for (int64_t e = 0; e < Ev; e += 16) {
          const __mmask16 km = tail_mask(Ev - e);
          _mm512_mask_storeu_ps(orow + e, km, _mm512_mul_ps(_mm512_maskz_loadu_ps(km, orow + e), va));
        }
      }
    }
    at::native::cpublas::brgemm(mrows, Ev, cnp, ldp, Ev, Ev, c0 > 0,
                                reinterpret_cast<const at::BFloat16*>(sc.pb.data()),
                                reinterpret_cast<const at::BFloat16*>(sc.vp.data()) + c0 * Ev, O, true);
  }
  uint16_t* out = p.out + (bh * L + i0) * Ev;
  float* lse = p.lse + bh * L + i0;
  const float a = fast ? p.scale : 1.f;
  // lse = a*m + ln l and 1/l for 16 rows at a time; rows with l = 0 (no key seen): +inf and 0
  float* inv = sc.inv.data();
  for (int64_t i = 0; i < mrows; i += 16) {
    const __mmask16 km = tail_mask(mrows - i);
    const __m512 lv = _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), km, l + i);
    const __mmask16 live = _mm512_cmp_ps_mask(lv, _mm512_setzero_ps(), _CMP_NEQ_UQ);  // NaN l: live
    const __m512 x = _mm512_mask_blend_ps(live, _mm512_set1_ps(1.f), lv);
    const __m512 lnl = log_ps(x);
    const __m512 mv = _mm512_maskz_loadu_ps(km, m + i);
    const __m512 lsev = _mm512_fmadd_ps(mv, _mm512_set1_ps(a), lnl);
    _mm512_mask_storeu_ps(lse + i, km, _mm512_mask_blend_ps(live, _mm512_set1_ps(std::numeric_limits<float>::infinity()), lsev));
    _mm512_mask_storeu_ps(inv + i, km, _mm512_maskz_div_ps(live, _mm512_set1_ps(1.f), x));
  }
  for (int64_t i = 0; i < mrows; ++i) {
    const float* orow = O + i * Ev;
    uint16_t* dst = out + i * Ev;
    const __m512 vi = _mm512_set1_ps(inv[i]);
    // an empty row (inv 0) gives exact zeros, whatever O holds
    for (int64_t e = 0; e < Ev; e += 16) {
      const __mmask16 km = tail_mask(Ev - e);
      const __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(km, orow + e), vi);
      _mm256_mask_storeu_epi16(dst + e, km, (__m256i)_mm512_cvtneps_pbh(x));
    }
  }
}

// Task t of (b, kv head, range of `per` query blocks); t_next is the task this thread runs next
// (or ntasks), prefetched meanwhile.
FA_AMX_TARGET void run_task(const Params& p, Scratch& sc, int64_t per, int64_t t, int64_t t_next, int64_t ntasks) {
  const int64_t nqb = (p.L + p.BM - 1) / p.BM;
  const int64_t nranges = (nqb + per - 1) / per;
  const int64_t group = p.Hq / p.Hkv;
  const int64_t r = t % nranges, bk = t / nranges, hk = bk % p.Hkv, b = bk / p.Hkv;
  const int64_t qb0 = r * per, qb1 = std::min(nqb, qb0 + per);
  const int64_t last_row = std::min(p.L, qb1 * p.BM);
  const int64_t rows = p.causal ? std::min(p.S, last_row) : p.S;
  pack_kv(p, p.k + bk * p.S * p.E, p.v + bk * p.S * p.Ev, rows, sc.kp.data(), sc.vp.data());
  if (p.kpm != nullptr) {
    const bool* kr = p.kpm + b * p.S;
    for (int64_t j = 0; j < p.S; ++j) sc.kb[j] = kr[j] ? -std::numeric_limits<float>::infinity() : 0.f;
  }
  // the next task's K and V, spread over this task's blocks
  const int64_t nblocks = group * (qb1 - qb0);
  int64_t kv_lines = 0;
  const uint16_t* q_next_task = nullptr;
  if (t_next < ntasks) {
    const int64_t bk2 = t_next / nranges, r2 = t_next % nranges;
    sc.set_region(1, p.k + bk2 * p.S * p.E, p.S * p.E * 2);
    sc.set_region(2, p.v + bk2 * p.S * p.Ev, p.S * p.Ev * 2);
    kv_lines = sc.pf_lines[1] + sc.pf_lines[2];
    const int64_t h2 = (bk2 % p.Hkv) * group, b2 = bk2 / p.Hkv;
    q_next_task = p.q + ((b2 * p.Hq + h2) * p.L + r2 * per * p.BM) * p.E;
  } else {
    sc.set_region(1, nullptr, 0);
    sc.set_region(2, nullptr, 0);
  }
  const int64_t q_lines = (p.BM * p.E * 2 + 63) / 64;
  sc.pf_per_row = (kv_lines / nblocks + q_lines + p.BM - 1) / p.BM + 1;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    for (int64_t qb = qb0; qb < qb1; ++qb) {
      const int64_t i0 = qb * p.BM;
      // the Q block after this one
      const uint16_t* qn = nullptr;
      if (qb + 1 < qb1) {
        qn = p.q + ((b * p.Hq + h) * p.L + i0 + p.BM) * p.E;
      } else if (g + 1 < group) {
        qn = p.q + ((b * p.Hq + h + 1) * p.L + qb0 * p.BM) * p.E;
      } else {
        qn = q_next_task;
      }
      sc.set_region(0, qn, qn != nullptr ? p.BM * p.E * 2 : 0);
      fwd_block(p, sc, b, h, i0, std::min(p.BM, p.L - i0));
    }
  }
}

// The CPU and this torch can run the path: AVX-512 BW/VL/DQ and avx512_bf16 for the row pass, and
// bf16 brgemm on AMX.
bool hardware_ok() {
  static const bool isa = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16");
  }();
  return isa && cpu::amx_bf16_brgemm_ok();
}

#endif  // FASTATTN_AMX_BUILD

}  // namespace

bool fwd_bf16(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
              const std::optional<at::Tensor>& key_padding_mask, double dropout_p, bool is_causal,
              double scale, const std::optional<at::Tensor>& seed, at::Tensor& out, at::Tensor& lse) {
#if defined(FASTATTN_AMX_BUILD)
  if (q.scalar_type() != at::kBFloat16) return false;
  if (tuning::get(tuning::Knob::kCpuAmx) == 0 || !hardware_ok()) return false;
  const int64_t N = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), Ev = v.size(3);
  if (N == 0 || Hq == 0 || L == 0 || S == 0 || E > 256 || Ev > 256) return false;  // old path does these
  if (!q.is_contiguous() || !k.is_contiguous() || !v.is_contiguous() || !out.is_contiguous()) return false;
  if (mask.defined() && mask.scalar_type() != at::kFloat) return false;  // float32: added at fp32
  Params p;
  p.N = N;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.L = L;
  p.S = S;
  p.E = E;
  p.Ev = Ev;
  p.Ep = round_up(E, 2);
  p.Sp = round_up(S, 32);
  p.BM = tuning::get(tuning::Knob::kAmxBm);
  const int64_t kc = tuning::get(tuning::Knob::kAmxKc);
  p.KC = round_up(std::max<int64_t>(32, kc > 0 ? kc : S <= 1024 ? p.Sp : 512), 32);
  constexpr int64_t pad = 16;  // row strides off powers of two
  p.ldk = p.Sp + pad;
  p.lds = p.KC + pad;
  p.ldp = p.KC + 2 * pad;
  p.q = reinterpret_cast<const uint16_t*>(q.data_ptr());
  p.k = reinterpret_cast<const uint16_t*>(k.data_ptr());
  p.v = reinterpret_cast<const uint16_t*>(v.data_ptr());
  p.mask = nullptr;
  p.msb = p.msh = p.msl = p.mss = 0;
  if (mask.defined()) {
    p.mask = mask.data_ptr<float>();
    p.msb = mask.stride(0);
    p.msh = mask.stride(1);
    p.msl = mask.stride(2);
    p.mss = mask.stride(3);
  }
  p.kpm = key_padding_mask.has_value() ? key_padding_mask->data_ptr<bool>() : nullptr;
  p.dropout_p = dropout_p;
  p.seed = dropout_p > 0 ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
  p.causal = is_causal;
  p.scale = static_cast<float>(scale);
  p.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();

  // Split each (b, kv head) into ranges of query blocks when there are too few heads for the
  // threads; each range repacks its K/V (cheap next to its GEMMs).
  const int64_t threads = at::get_num_threads();
  const int64_t nqb = (L + p.BM - 1) / p.BM;
  const int64_t heads = N * Hkv;
  const int64_t want = 4 * threads;
  int64_t per = nqb;
  if (heads < want) per = std::max<int64_t>(1, (nqb * heads + want - 1) / want);
  per = std::min<int64_t>(per, nqb);
  const int64_t ntasks = heads * ((nqb + per - 1) / per);
  const int64_t nthreads = std::min<int64_t>(threads, ntasks);
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    // Scratch lives on with the (persistent) intra-op thread: fresh buffers on every call cost
    // page faults (the score block alone is BM x KC floats, over malloc's mmap threshold). Every
    // element a call reads it has written first, so stale contents do not matter.
    thread_local Scratch sc;
    sc.kp.resize(p.Ep / 2 * p.ldk);
    sc.vp.resize(p.Sp * Ev);
    if (E != p.Ep) sc.qb.resize(p.BM * p.Ep);
    sc.s.resize(p.BM * p.lds);
    sc.pb.resize(p.BM * p.ldp);
    sc.o.resize(p.BM * Ev);
    sc.m.resize(p.BM);
    sc.l.resize(p.BM);
    sc.inv.resize(p.BM);
    sc.cm.resize(p.BM);
    if (p.kpm != nullptr) sc.kb.resize(S);
    sc.tmp.resize(16);
    // claim the next task before running this one, so that its K/V can be prefetched
    int64_t t = next.fetch_add(1);
    while (t < ntasks) {
      const int64_t t_next = next.fetch_add(1);
      run_task(p, sc, per, t, t_next, ntasks);
      t = t_next;
    }
    if (sc.kp.capacity() * 4 + sc.vp.capacity() * 2 > (size_t{8} << 20)) {  // keep at most ~8 MB of K/V
      std::vector<uint32_t>().swap(sc.kp);
      std::vector<uint16_t>().swap(sc.vp);
    }
    at::native::cpublas::brgemm_release();
  };
  if (nthreads <= 1) {
    worker();
  } else {
    at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) { worker(); });
  }
  g_fwd_calls.fetch_add(1);
  return true;
#else
  (void)q; (void)k; (void)v; (void)mask; (void)key_padding_mask; (void)dropout_p; (void)is_causal;
  (void)scale; (void)seed; (void)out; (void)lse;
  return false;
#endif
}

int64_t fwd_calls() { return g_fwd_calls.load(); }

bool available() {
#if defined(FASTATTN_AMX_BUILD)
  return hardware_ok();
#else
  return false;
#endif
}

}  // namespace amx
}  // namespace cpu_attn
}  // namespace fastattn

FASTATTN_CPU_PATH_OPS(fastattn_amx, available, &fastattn::cpu_attn::amx::available,
                      &fastattn::cpu_attn::amx::fwd_calls)
