"""The Triton kernels import and run without fastattn._C (a GPU machine whose C++ build failed must
still run them): a child process blocks `import fastattn._C` (ImportError, as when it was never
built) and runs a small attention and feed-forward under the interpreter, checked against float64,
through the launchers and through the public API with the triton backend."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

_BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class _NoC(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastattn._C":
                raise ImportError("fastattn._C blocked by the test (as if it failed to build)")
            return None

    sys.meta_path.insert(0, _NoC())
""")

_KERNELS = _BLOCKER + textwrap.dedent("""
    import math, torch
    from fastattn import kernels  # the package imports without _C
    from fastattn.kernels import attention as A, feed_forward as F
    from fastattn.testing import check_bound
    assert "fastattn._C" not in sys.modules
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 9, 16, generator=g) for _ in range(4))
    out, lse = A.attention_forward(q, k, v, None, None, 0.0, True, 0.25, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True,
                                                           scale=0.25)
    same = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    check_bound("attention out", out, same, ref)
    dq, dk, dv = A.attention_backward(do, q, k, v, out, lse, None, None, 0.0, True, 0.25, None)
    assert dq.shape == q.shape and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    x, w1, w2 = torch.randn(7, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(16, 24, generator=g)
    y, saved = F.ffn_forward(x, w1, None, w2, None, "relu", 0.0, None, True)
    ref = torch.relu(x.double() @ w1.double().T) @ w2.double().T
    check_bound("ffn out", y, torch.relu(x @ w1.T) @ w2.T, ref)
    print("ok")
""")

_API = _BLOCKER + textwrap.dedent("""
    import torch, fastattn
    q = torch.randn(1, 2, 9, 16)
    with fastattn.use_backend("triton"):
        out = fastattn.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
    print("ok")
""")


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_kernels_run_without_the_cpp_extension():
    pytest.importorskip("triton")
    proc = _run(_KERNELS)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_triton_backend_runs_without_the_cpp_extension():
    pytest.importorskip("triton")
    proc = _run(_API)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
