// bfloat16 feed-forward on CPUs with AVX512_BF16 but no AMX (the AMX path is tried first).
//
// First choice: the AMX path's own tiled code (ffn_fwd_amx / ffn_bwd_amx in feed_forward.cpp), whose
// bf16 x bf16 -> fp32 brgemm (at::native::cpublas::brgemm, VNNI-packed B) oneDNN also runs with
// vdpbf16ps on avx512_bf16 CPUs; there cpublas::could_pack says false (B needs no AMX packing), so
// the AMX probe refuses the path, and bf16dot_brgemm_ok() below probes the same call without it.
//
// Fallback, for a torch whose CPUBlas has no bf16 brgemm: the GEMMs as bf16 matmuls in oneDNN
// (at::addmm / at::mm on bfloat16 tensors, in fixed row blocks across threads: mm_rows), this file
// adding only the element-wise parts, tiled over tokens in parallel:
//   forward   pre = x w1^T + b1 (bf16, also what is saved)  ->  fp32 activation and dropout (the same
//             epilogue and Philox counters as the float path)  ->  hid rounded to bf16  ->
//             out = hid w2^T + b2
//   backward  dh = grad_out w2 (bf16)  ->  fp32 dpre = dh * keep * act'(pre), hid = act(pre) * keep,
//             db1 in fp32 per tile, summed in tile order  ->  dx = dpre w1, dW1 = dpre^T x,
//             dW2 = grad_out^T hid.
// The rounding points (pre, hid, dh, dpre to bf16) are those of eager bf16 nn.Linear + activation.
// Included by csrc/cpu/feed_forward.cpp inside its anonymous namespace, after the epilogues; chosen
// by bf16dot::enabled() (csrc/cpu/bf16dot.h), counted by bf16dot::count_ffn_fwd / _bwd either way.
// FASTATTN_CPU_BF16DOT_FFN=mm forces the fallback (for its tests).
#if defined(FASTATTN_AMX_BUILD)
// bf16 brgemm runs here and gives the right numbers (amx_probe.h's probe, once per process), unless
// FASTATTN_CPU_BF16DOT_FFN=mm asks for the whole-matrix fallback.
bool bf16dot_brgemm_ok() {
  static const bool ok = [] {
    const char* env = std::getenv("FASTATTN_CPU_BF16DOT_FFN");
    if (env != nullptr && std::string(env) == "mm") return false;
    return ::fastattn::cpu::bf16_brgemm_works();
  }();
  return ok;
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define FASTATTN_FFN_BF16DOT 1

// rows x F floats (row stride F) rounded to bf16 (nearest even) into dst (row stride F).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16"))) void bf16dot_round_rows(
    int64_t rows, int64_t F, const float* __restrict__ src, at::BFloat16* __restrict__ dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * F;
    at::BFloat16* d = dst + r * F;
    int64_t f = 0;
    for (; f + 16 <= F; f += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + f), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s + f)));
    for (; f < F; ++f) d[f] = at::BFloat16(s[f]);
  }
}

// n bf16 values widened to float (exact).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void bf16dot_widen(int64_t n,
                                                                                const at::BFloat16* __restrict__ src,
                                                                                float* __restrict__ dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(w, 16));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// out = [bias +] a @ b (bf16, fp32 accumulation in oneDNN), in blocks of rows of a fixed size run by
// parallel_each: each block is one single-threaded call, so the result cannot depend on the thread
// count (one multi-threaded call may split the reduction across threads).
void mm_rows(at::Tensor out, const at::Tensor& a, const at::Tensor& b,
             const std::optional<at::Tensor>& bias = std::nullopt) {
  constexpr int64_t kRows = 256;
  const int64_t M = a.size(0);
  parallel_each((M + kRows - 1) / kRows, [&](int64_t i) {
    const int64_t r0 = i * kRows, n = std::min(kRows, M - r0);
    at::Tensor o = out.narrow(0, r0, n);
    if (bias.has_value())
      at::addmm_out(o, *bias, a.narrow(0, r0, n), b);
    else
      at::mm_out(o, a.narrow(0, r0, n), b);
  });
}

void ffn_fwd_bf16dot(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                     const at::Tensor& w2, const std::optional<at::Tensor>& b2, Act act, double dropout_p,
                     uint64_t seed, const FfnShape& s, at::Tensor& out, at::Tensor* saved) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t T = s.T, F = s.F;
  at::Tensor pre = at::empty({T, F}, x.options());  // bf16
  mm_rows(pre, x, w1.t(), b1);
  at::Tensor hid = at::empty({T, F}, x.options());
  const BoundEpilogues<c10::BFloat16, float> ep(act, dropout_p, seed, F);
  const at::BFloat16* pre_p = pre.data_ptr<at::BFloat16>();
  at::BFloat16* hid_p = hid.data_ptr<at::BFloat16>();
  const int64_t ntiles = (T + kFwdTile - 1) / kFwdTile;
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(static_cast<size_t>(kFwdTile * F));
    std::vector<float> keep(ep.keep_size());
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kFwdTile, rows = std::min(kFwdTile, T - t0);
      bf16dot_widen(rows * F, pre_p + t0 * F, h.data());
      ep.fwd(rows, t0, h.data(), nullptr, nullptr, keep.data());
      bf16dot_round_rows(rows, F, h.data(), hid_p + t0 * F);
    }
  });
  mm_rows(out, hid, w2.t(), b2);
  if (saved != nullptr) *saved = pre;
  bf16dot::count_ffn_fwd();
}

void ffn_bwd_bf16dot(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                     const at::Tensor& saved, Act act, double dropout_p, uint64_t seed, const FfnShape& s,
                     at::Tensor& dx, at::Tensor& dw1, at::Tensor& db1, at::Tensor& dw2, at::Tensor& db2) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const int64_t T = s.T, F = s.F;
  at::Tensor dh = at::empty({T, F}, x.options());  // bf16
  mm_rows(dh, grad_out, w2);
  at::Tensor dpre = at::empty({T, F}, x.options());
  at::Tensor hid = at::empty({T, F}, x.options());
  const BoundEpilogues<c10::BFloat16, float> ep(act, dropout_p, seed, F);
  const int64_t ntiles = (T + kBwdTile - 1) / kBwdTile;
  // db1 per tile, summed in tile order: the same bits whatever the thread count
  at::Tensor db1_part = at::zeros({ntiles, F}, at::TensorOptions().dtype(at::kFloat));
  float* db1_pp = db1_part.data_ptr<float>();
  const at::BFloat16* dh_p = dh.data_ptr<at::BFloat16>();
  const at::BFloat16* pre_p = saved.data_ptr<at::BFloat16>();
  at::BFloat16* dpre_p = dpre.data_ptr<at::BFloat16>();
  at::BFloat16* hid_p = hid.data_ptr<at::BFloat16>();
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> d(static_cast<size_t>(kBwdTile * F));
    std::vector<float> hbuf(static_cast<size_t>(kBwdTile * F));
    std::vector<float> keep(ep.keep_size());
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t t0 = tile * kBwdTile, rows = std::min(kBwdTile, T - t0);
      bf16dot_widen(rows * F, dh_p + t0 * F, d.data());
      ep.bwd(rows, t0, d.data(), pre_p + t0 * F, hbuf.data(), db1_pp + tile * F, keep.data());
      bf16dot_round_rows(rows, F, d.data(), dpre_p + t0 * F);
      bf16dot_round_rows(rows, F, hbuf.data(), hid_p + t0 * F);
    }
  });
  mm_rows(dx, dpre, w1);
  mm_rows(dw1, dpre.t(), x);
  mm_rows(dw2.t(), hid.t(), grad_out);  // dW2^T (F, D2): blocks of F rows
  std::vector<float> b1(static_cast<size_t>(F), 0.f), b2(static_cast<size_t>(s.D2), 0.f);
  for (int64_t tile = 0; tile < ntiles; ++tile)
    for (int64_t f = 0; f < F; ++f) b1[f] += db1_pp[tile * F + f];
  const at::BFloat16* go_p = grad_out.data_ptr<at::BFloat16>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < s.D2; ++j) b2[j] += static_cast<float>(go_p[t * s.D2 + j]);
  for (int64_t f = 0; f < F; ++f) db1.data_ptr<at::BFloat16>()[f] = at::BFloat16(b1[f]);
  for (int64_t j = 0; j < s.D2; ++j) db2.data_ptr<at::BFloat16>()[j] = at::BFloat16(b2[j]);
  bf16dot::count_ffn_bwd();
}
#endif
