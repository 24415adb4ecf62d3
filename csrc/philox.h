// The dropout random stream every fastattn backend shares; twin of fastattn/_philox.py and of
// Triton's tl.rand(seed, offset). keep(offset) = philox_uniform(seed, offset) >= p.
// Counters: attention (b, h, i, j) of (N, Hq, L, S) -> ((b*Hq + h)*L + i)*S + j;
//           feed-forward hidden (t, f) of (T, F) -> t*F + f.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HD __host__ __device__ __forceinline__
#else
#define FASTATTN_HD inline
#endif

namespace fastattn {

FASTATTN_HD uint32_t philox_mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First output word of Philox-4x32-10 with counter (lo(offset), hi(offset), 0, 0), key (lo(seed), hi(seed)).
FASTATTN_HD uint32_t philox_word(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = philox_mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = philox_mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Uniform float in [0, 1), bit-identical to tl.rand.
FASTATTN_HD float philox_uniform(uint64_t seed, uint64_t offset) {
  int32_t x = static_cast<int32_t>(philox_word(seed, offset));
  if (x < 0) x = ~x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

}  // namespace fastattn
