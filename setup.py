"""Builds fastattn._C from csrc/.

C++ (CPU kernels) always. CUDA sources (csrc/cuda/*.cu) when FORCE_CUDA=1, or when nvcc is found
and this torch was built with CUDA. Switches, all in the open:
  FORCE_CUDA=1            build the CUDA kernels even when torch.cuda.is_available() is False
  FASTATTN_NO_CUDA=1      never build them
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0" (torch's own variable; default "8.0;9.0" here)
  FASTATTN_MARCH=native   add -march=<value> (off by default: wheels must run on any x86-64)
  FASTATTN_DEBUG=1        -O0 -g
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("FASTATTN_NO_CUDA") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    have_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    return have_nvcc and torch.version.cuda is not None


def _extension():
    debug = os.environ.get("FASTATTN_DEBUG") == "1"
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-fopenmp"] if os.name != "nt" else []
    march = os.environ.get("FASTATTN_MARCH")
    if march:
        cxx.append(f"-march={march}")
    sources = ["csrc/fastattn.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("FASTATTN_CXX_FLAGS", '"' + " ".join(cxx) + '"')]
    include_dirs = [os.path.join(ROOT, "csrc")]
    extra = {"cxx": cxx}
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        define_macros += [("FASTATTN_WITH_CUDA", None), ("FASTATTN_CUDA_ARCHS", '"' + archs + '"')]
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
                         "-std=c++20", "-Xptxas=-v" if os.environ.get("FASTATTN_PTXAS_VERBOSE") else "-O3"]
        return CUDAExtension("fastattn._C", sources, include_dirs=include_dirs,
                             define_macros=define_macros, extra_compile_args=extra,
                             libraries=["cublasLt", "cublas"])
    return CppExtension("fastattn._C", sources, include_dirs=include_dirs,
                        define_macros=define_macros, extra_compile_args=extra,
                        extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
