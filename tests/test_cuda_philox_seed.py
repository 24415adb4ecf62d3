"""csrc/cuda/philox_seed.cu (torch.ops.fastattn.cuda_philox_seed's kernel) compiles with the machine's
nvcc for sm_80 and sm_90 against torch's two plain Philox-state headers alone (it includes no c10
CUDA build macros, so the CPU build of torch's include folder suffices) — no GPU needed."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "csrc" / "cuda" / "philox_seed.cu"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
NVCC = CUDA_HOME / "bin" / "nvcc"
FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]  # setup.py's

pytestmark = pytest.mark.skipif(not NVCC.exists(), reason=f"no nvcc at {NVCC} (set CUDA_HOME)")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_philox_seed_kernel_compiles(arch, tmp_path):
    includes = [f"-I{p}" for p in cpp_ext.include_paths()] + [f"-I{SRC.parent}"]
    cubin = tmp_path / f"philox_seed.{arch}.cubin"
    proc = subprocess.run([str(NVCC), *FLAGS, f"-arch={arch}", "-cubin", "-Xptxas", "-v", *includes, str(SRC),
                           "-o", str(cubin)], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert cubin.stat().st_size > 0
    assert "philox_seed_kernel" in log, log
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert spills and all(s == ("0", "0") for s in spills), log
