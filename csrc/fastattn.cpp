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

#include "tuning.h"

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

// {name: (value, meaning)} of every tuning knob (csrc/tuning.h); FASTATTN_CPU_ISA's value is its
// name (auto, default, avx2, avx512), the others are integers.
pybind11::dict tuning_knobs() {
  namespace t = fastattn::tuning;
  pybind11::dict d;
  for (int i = 0; i < static_cast<int>(t::Knob::kCount); ++i) {
    const auto k = static_cast<t::Knob>(i);
    const int64_t v = t::get(k);
    pybind11::object value = k == t::Knob::kCpuIsa ? pybind11::object(pybind11::str(t::isa_name(v)))
                                                     : pybind11::object(pybind11::int_(v));
    d[t::info(k).name] = pybind11::make_tuple(value, std::string(t::info(k).meaning));
  }
  return d;
}

// Sets one knob for this process, from the text an environment variable would hold (an int is
// taken as its decimal text). Returns the previous value as tuning_knobs() shows it.
pybind11::object set_tuning_knob(const std::string& name, const pybind11::object& value) {
  namespace t = fastattn::tuning;
  const t::Knob k = t::by_name(name);
  const int64_t old = t::get(k);
  t::set(k, t::parse(k, pybind11::str(value).cast<std::string>()));
  return k == t::Knob::kCpuIsa ? pybind11::object(pybind11::str(t::isa_name(old)))
                               : pybind11::object(pybind11::int_(old));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastattn C++/CUDA kernels; ops live under torch.ops.fastattn";
  m.def("build_info", &build_info, "How this extension was built: compiler, flags, torch, CUDA archs.");
  m.def("tuning_knobs", &tuning_knobs,
        "The C++ kernels' tuning knobs (environment variables read once): {name: (value, meaning)}.");
  m.def("set_tuning_knob", &set_tuning_knob, pybind11::arg("name"), pybind11::arg("value"),
        "Sets one tuning knob for this process (value as its environment variable would hold it); returns the "
        "previous value.");
}
