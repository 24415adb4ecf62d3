// fastattn's pybind11 module: how the extension was built. The op schemas are written once, in
// Python (fastattn/attention.py, fastattn/feed_forward.py, on the `fastattn` namespace that
// fastattn/_library.py defines); each device implements them here under the same names with
// TORCH_LIBRARY_IMPL(fastattn, CPU|CUDA, m) (csrc/cpu/, csrc/cuda/), and PyTorch's dispatcher picks
// by the tensors' device. Implementations may register before the schema exists: the dispatcher
// checks them against it when Python defines it.
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
