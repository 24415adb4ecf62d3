// bfloat16 through AVX512-BF16 dot products (vdpbf16ps) on CPUs without AMX: which calls may use it
// and how many it served (the tests assert the path ran through these counters).
//
// enabled(): the CPU has avx512f/bw/dq/vl and avx512_bf16, and FASTATTN_CPU_BF16DOT is not "0"
// (read once per process). The AMX paths, where the CPU has AMX, are tried first by their callers.
#pragma once

#include <cstdint>

namespace fastattn::bf16dot {

bool cpu_has_bf16dot();  // the instruction set only
bool enabled();          // cpu_has_bf16dot() and not switched off

void count_attn_fwd();
void count_attn_bwd();
void count_ffn_fwd();
void count_ffn_bwd();

}  // namespace fastattn::bf16dot
