// Tuning knobs of the C++ CPU kernels, in one place. Each is an environment variable read once, on
// first use (not on every call); fastattn._C.tuning_knobs() lists them with their current values
// and meaning, and fastattn._C.set_tuning_knob(name, value) changes one for this process (tests,
// tuners). Values are checked when read or set: a bad value is an error naming the knob.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace fastattn {
namespace tuning {

enum class Knob : int { kCpuIsa = 0, kCpuBm, kCpuBn, kCpuAmx, kAmxBm, kAmxKc, kFfnAmx, kFfnNoBrgemm, kCount };

// FASTATTN_CPU_ISA's values.
enum CpuIsa : int64_t { kIsaAuto = 0, kIsaDefault = 1, kIsaAvx2 = 2, kIsaAvx512 = 3 };

struct KnobInfo {
  const char* name;
  int64_t fallback;
  int64_t lo, hi, multiple;  // accepted integer values: lo <= v <= hi, v % multiple == 0
  const char* meaning;
};

inline const KnobInfo& info(Knob k) {
  static const KnobInfo table[] = {
      {"FASTATTN_CPU_ISA", kIsaAuto, kIsaAuto, kIsaAvx512, 1,
       "CPU attention kernels' instruction set: avx512, avx2 or default (unset: torch's CPU capability, "
       "which ATEN_CPU_CAPABILITY sets)"},
      {"FASTATTN_CPU_BM", 64, 16, 512, 16, "query rows per block of the CPU attention kernels"},
      {"FASTATTN_CPU_BN", 64, 1, 1024, 1, "keys per block of the CPU attention kernels"},
      {"FASTATTN_CPU_AMX", 1, 0, 1, 1, "1: bfloat16 attention forward on AMX where the CPU has it; 0: off"},
      {"FASTATTN_AMX_BM", 128, 1, 4096, 1, "query rows per block of the AMX attention forward"},
      {"FASTATTN_AMX_KC", 0, 0, 1 << 20, 1,
       "keys per chunk of the AMX attention forward, rounded up to 32 (0: the whole row up to 1024 keys, else 512)"},
      {"FASTATTN_FFN_AMX", 1, 0, 1, 1,
       "1: bfloat16 feed-forward (forward and backward) on AMX where the CPU has it; 0: off"},
      {"FASTATTN_FFN_NO_BRGEMM", 0, 0, 1, 1,
       "1: the CPU feed-forward's float32 GEMMs through at::mm instead of oneDNN's brgemm"},
  };
  static_assert(sizeof(table) / sizeof(table[0]) == static_cast<size_t>(Knob::kCount), "one row per knob");
  return table[static_cast<int>(k)];
}

inline const char* isa_name(int64_t v) {
  switch (v) {
    case kIsaDefault: return "default";
    case kIsaAvx2: return "avx2";
    case kIsaAvx512: return "avx512";
    default: return "auto";
  }
}

// The knob's value from its text form (an environment variable's or set_tuning_knob's).
inline int64_t parse(Knob k, const std::string& text) {
  const KnobInfo& ki = info(k);
  if (k == Knob::kCpuIsa) {
    std::string t = text;
    for (auto& c : t) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    for (int64_t v = kIsaAuto; v <= kIsaAvx512; ++v)
      if (t == isa_name(v)) return v;
    TORCH_CHECK_VALUE(false, "fastattn: tuning knob ", ki.name, " got '", text,
                      "'; expected avx512, avx2, default or auto");
  }
  char* end = nullptr;
  const long long v = std::strtoll(text.c_str(), &end, 10);
  TORCH_CHECK_VALUE(!text.empty() && end != nullptr && *end == '\0' && v >= ki.lo && v <= ki.hi &&
                        v % ki.multiple == 0,
                    "fastattn: tuning knob ", ki.name, " got '", text, "'; expected an integer in [", ki.lo, ", ",
                    ki.hi, "]", ki.multiple > 1 ? " that is a multiple of " : "",
                    ki.multiple > 1 ? std::to_string(ki.multiple) : std::string());
  return v;
}

// The current values, read from the environment on first use.
inline std::atomic<int64_t>* values() {
  static std::atomic<int64_t> v[static_cast<int>(Knob::kCount)];
  static const bool read = [] {
    for (int i = 0; i < static_cast<int>(Knob::kCount); ++i) {
      const Knob k = static_cast<Knob>(i);
      const char* env = std::getenv(info(k).name);
      v[i].store(env != nullptr && *env != '\0' ? parse(k, env) : info(k).fallback);
    }
    return true;
  }();
  (void)read;
  return v;
}

inline int64_t get(Knob k) { return values()[static_cast<int>(k)].load(std::memory_order_relaxed); }

inline void set(Knob k, int64_t v) { values()[static_cast<int>(k)].store(v, std::memory_order_relaxed); }

// The knob called `name`, or an error listing the knobs.
inline Knob by_name(const std::string& name) {
  std::string known;
  for (int i = 0; i < static_cast<int>(Knob::kCount); ++i) {
    if (name == info(static_cast<Knob>(i)).name) return static_cast<Knob>(i);
    known += (i > 0 ? ", " : "") + std::string(info(static_cast<Knob>(i)).name);
  }
  TORCH_CHECK_VALUE(false, "fastattn: argument 'name' got '", name, "'; expected one of ", known);
  return Knob::kCount;
}

}  // namespace tuning
}  // namespace fastattn
