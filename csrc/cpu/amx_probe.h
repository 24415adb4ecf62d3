// Whether this CPU and this torch run bf16 x bf16 -> fp32 brgemm on AMX (the probe the AMX paths of
// attention_amx.cpp and feed_forward.cpp share; each adds the AVX-512 features its own vector code
// needs). FASTATTN_AMX_BUILD: the build can have such a path at all (x86-64, GCC/Clang, a torch whose
// at::native::cpublas has the bf16 brgemm).
#pragma once
#include <ATen/native/CPUBlas.h>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define FASTATTN_AMX_BUILD 1
#endif

namespace fastattn {
namespace cpu {

// f(), or false when it throws.
template <typename F>
inline bool probe(F f) noexcept {
  try {
    return f();
  } catch (...) {
    return false;
  }
}

#if defined(FASTATTN_AMX_BUILD)
// A bf16 brgemm gives the right answer on a tiny product: A (1 x 2) = [1, 2], B (2 x 16) in VNNI
// layout with every column (3, 4) -> 11. On AMX and on AVX512-BF16 without AMX (oneDNN picks the
// kernel); false on any exception. Probed once per process.
inline bool bf16_brgemm_works() {
  static const bool ok = probe([] {
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
  });
  return ok;
}

// torch reports AMX through could_pack(kBFloat16); then the bf16 brgemm must work (above).
inline bool amx_bf16_brgemm_ok() {
  static const bool ok = probe([] { return at::native::cpublas::could_pack(at::kBFloat16) && bf16_brgemm_works(); });
  return ok;
}
#else
inline bool bf16_brgemm_works() { return false; }
inline bool amx_bf16_brgemm_ok() { return false; }
#endif

}  // namespace cpu
}  // namespace fastattn
