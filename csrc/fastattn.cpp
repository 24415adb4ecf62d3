// The one place fastattn's C++ ops are declared. Each device adds its kernels under the same names
// with TORCH_LIBRARY_IMPL(fastattn, CPU|CUDA, m) in csrc/cpu/ and csrc/cuda/; PyTorch's dispatcher
// picks by the tensors' device. Fake (meta) kernels and autograd are registered from Python
// (fastattn/ops.py), so torch.compile and opcheck see these ops whole.
//
// Tensors the Python dispatcher hands these ops (fastattn/api.py guarantees it):
//   q (N, Hq, L, E), k (N, Hkv, S, E), v (N, Hkv, S, Ev): contiguous, one dtype, Hq % Hkv == 0.
//   attn_mask: additive, dtype of q, an expanded (N, Hq, L, S) view (strides may be 0); read it
//              through its strides, never materialise it.
//   key_padding_mask: bool (N, S) contiguous, true = key ignored.
//   seed: when dropout_p > 0, an int64 tensor: (1,) seed on the CPU (counter offset 0), or (2,)
//         (seed, offset) — on CUDA on the inputs' device, read by the kernels (see csrc/philox.h,
//         fastattn/_philox.py); else None.
#include <torch/extension.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#ifndef FASTATTN_CXX_FLAGS
#define FASTATTN_CXX_FLAGS ""
#endif
#ifndef FASTATTN_CUDA_ARCHS
#define FASTATTN_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(fastattn, m) {
  // -> (out (N, Hq, L, Ev) dtype of q, lse (N, Hq, L) float32; +inf on a row that sees no key)
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? key_padding_mask, "
      "float dropout_p, bool is_causal, float scale, Tensor? seed) -> (Tensor, Tensor)");
  // -> (dq, dk, dv) shaped like q, k, v (dk, dv summed over each GQA group's query heads)
  m.def(
      "attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? attn_mask, Tensor? key_padding_mask, float dropout_p, bool is_causal, float scale, "
      "Tensor? seed) -> (Tensor, Tensor, Tensor)");
  // x (T, D) contiguous, w1 (F, D), b1 (F,)?, w2 (D2, F), b2 (D2,)?
  // -> (out (T, D2), saved): saved = pre-activation x @ w1^T + b1, (T, F) dtype of x, when
  //    save_for_backward, else an empty (0,) tensor.
  m.def(
      "ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, "
      "float dropout_p, Tensor? seed, bool save_for_backward) -> (Tensor, Tensor)");
  // -> (dx (T, D), dw1 (F, D), db1 (F,), dw2 (D2, F), db2 (D2,)); db1/db2 even when a bias is None
  m.def(
      "ffn_bwd(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor saved, "
      "str activation, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // -> int64 (2,) (Philox seed, counter offset) of the default CUDA generator of like's device, on that
  //    device; the generator's offset advances by increment (a multiple of 4). CUDA only (csrc/cuda/),
  //    capture-safe: fastattn/_philox.py new_seed() draws CUDA dropout keys with it.
  m.def("cuda_philox_seed(Tensor like, int increment) -> Tensor", {at::Tag::nondeterministic_seeded});
}

namespace {

std::string torch_version() {
  std::ostringstream s;
  s << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH;
  return s.str();
}

pybind11::dict build_info() {
  pybind11::dict d;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = std::string("unknown");
#endif
  d["cxx_flags"] = std::string(FASTATTN_CXX_FLAGS);
  d["torch_built_against"] = torch_version();
#if defined(FASTATTN_WITH_CUDA)
  d["with_cuda"] = true;
  d["cuda_archs"] = std::string(FASTATTN_CUDA_ARCHS);
#else
  d["with_cuda"] = false;
  d["cuda_archs"] = std::string("none");
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn C++/CUDA kernels; ops live under torch.ops.fastattn";
  m.def("build_info", &build_info, "How this extension was built: compiler, flags, torch, CUDA archs.");
}
