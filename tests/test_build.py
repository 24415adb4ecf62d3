"""The build and its self-description."""
import subprocess
import sys

import fastattn
from fastattn import _library as ops


def test_extension_built_and_describes_itself():
    assert ops.extension_error() is None, ops.extension_error()
    info = ops.build_info()
    for key in ("compiler", "cxx_flags", "torch_built_against", "with_cuda", "cuda_archs"):
        assert key in info, key
    assert "-march=native" not in info["cxx_flags"], "no -march=native unless asked for"
    import torch

    assert info["torch_built_against"] == torch.__version__.split("+")[0]


def test_info_command_lists_every_backend():
    res = subprocess.run([sys.executable, "-m", "fastattn.info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("cuda", "triton", "cpu", "reference"):
        assert f"  {name}" in res.stdout
    assert "fastattn " + fastattn.__version__ in res.stdout


def test_kernels_subpackage_installed_under_fastattn():
    import importlib.util

    spec = importlib.util.find_spec("fastattn.kernels")
    assert spec is not None and spec.origin.replace("\\\\", "/").endswith("kernels/__init__.py")


def test_no_gpu_query_at_import():
    code = ("import torch\n"
            "torch.cuda.is_available = lambda: (_ for _ in ()).throw(AssertionError('GPU queried at import'))\n"
            "import fastattn, fastattn.modules, fastattn.models\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
