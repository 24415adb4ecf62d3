// The feed-forward's activations, one list for every C++/CUDA kernel (plain C++: .cu files
// include it too). The names the ops take are parsed once, in csrc/checks.h (parse_activation).
#pragma once

namespace fastattn {

enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2 };

}  // namespace fastattn
