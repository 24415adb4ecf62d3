"""The key-range kernel of the classic (and sm_90) Triton launchers: kernels/attention.py's
_kv_range_kernel computes kv_range (N, 2) int32 = [first unpadded key, last unpadded key + 1] per batch
element ([S, 0] for a wholly padded row) in one launch, where the launcher used to spend eight torch ops
(kv_range_torch, kept for CPU tensors outside the interpreter and as the reference here).

* Logic: under the interpreter (no GPU) or on the GPU, the kernel's kv_range equals kv_range_torch's
  bit for bit, for no padding, left/right/random padding, wholly padded rows, S not a multiple of the
  block (small blocks so the row takes several steps, and the launched KV_RANGE_BLOCK), N = 1 and N > 1,
  and a mask that is a row slice (unaligned pointer). The launcher's _kpm_args takes the kernel's result.
* Compile facts: tests/aot/kv_range.py compiles the launched tile for sm_80 and sm_90 with triton 3.9 and
  3.6 (aligned and unaligned mask pointer): 0 spills, no stack frame.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from helpers import aot_env

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
ROOT = pathlib.Path(__file__).resolve().parents[1]

try:
    A = importlib.import_module("fastattn.kernels.attention")
except ImportError:  # a checkout that was never installed
    sys.path.insert(0, str(ROOT))
    A = importlib.import_module("kernels.attention")


def _masks(n: int, s: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    none = torch.zeros(n, s, dtype=torch.bool)
    left, right = none.clone(), none.clone()
    for b in range(n):  # a different amount per row, 0 .. s - 1 keys padded
        cut = int(torch.randint(0, s, (1,), generator=g))
        left[b, :cut] = True
        right[b, s - cut:] = True
    rand = torch.rand(n, s, generator=g) < 0.5
    both = none.clone()
    both[:, : s // 3] = True
    both[:, s - s // 4:] = True
    full = rand.clone()
    full[0] = True                                    # a wholly padded row among others
    single = torch.ones(n, s, dtype=torch.bool)
    single[:, (s - 1) // 2] = False                   # one key left, in the middle
    return dict(none=none, left=left, right=right, random=rand, both_ends=both, full_row=full, one_key=single,
                all_padded=torch.ones(n, s, dtype=torch.bool))


def _kernel(kpm: torch.Tensor, block: int) -> torch.Tensor:
    u8 = kpm.to(DEVICE).contiguous().view(torch.uint8)
    return A.kv_range(u8, block).cpu()


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("s,block", [(1, 16), (16, 16), (37, 16), (100, 32), (300, A.KV_RANGE_BLOCK),
                                     (A.KV_RANGE_BLOCK + 77, A.KV_RANGE_BLOCK)])
def test_kernel_equals_torch(n, s, block):
    for name, kpm in _masks(n, s, seed=s + n).items():
        got, want = _kernel(kpm, block), A.kv_range_torch(kpm)
        assert got.dtype == torch.int32 and tuple(got.shape) == (n, 2), name
        assert torch.equal(got, want), f"{name}: kernel {got.tolist()} != torch {want.tolist()}"


def test_conventions():
    """Exact values, not only agreement with the torch ops: [first, last + 1], [S, 0] when wholly padded."""
    s = 40
    kpm = torch.zeros(4, s, dtype=torch.bool)
    kpm[1, :5] = True          # left padding: [5, 40)
    kpm[2, 33:] = True         # right padding: [0, 33)
    kpm[3] = True              # wholly padded: [40, 0]
    assert _kernel(kpm, 16).tolist() == [[0, 40], [5, 40], [0, 33], [40, 0]]
    assert A.kv_range_torch(kpm).tolist() == [[0, 40], [5, 40], [0, 33], [40, 0]]


def test_unaligned_row_slice():
    """A mask viewed from a larger one at a row offset (its pointer not 16-byte aligned) is read correctly."""
    big = _masks(5, 37, seed=9)["random"]
    big[2] = True
    kpm = big[1:]              # contiguous, storage offset 37 bytes
    assert kpm.is_contiguous() and kpm.storage_offset() == 37
    u8 = kpm.to(DEVICE).view(torch.uint8) if DEVICE == "cpu" else big.to(DEVICE)[1:].view(torch.uint8)
    assert torch.equal(A.kv_range(u8, 16).cpu(), A.kv_range_torch(kpm))


def test_launcher_uses_kernel_and_keeps_caller_mask(monkeypatch):
    """_kpm_args returns the kernel's kv_range (the torch ops are not called) and leaves the mask as it was."""
    kpm = _masks(3, 50, seed=3)["random"].to(DEVICE)
    before = kpm.clone()
    q = torch.empty(3, 1, 1, 1, device=DEVICE)
    want = A.kv_range_torch(kpm.cpu())

    def no_torch(_):
        raise AssertionError("kv_range_torch called where the kernel should run")

    monkeypatch.setattr(A, "kv_range_torch", no_torch)
    u8, kv = A._kpm_args(kpm, q, 50)
    assert u8.dtype == torch.uint8 and torch.equal(u8.bool(), kpm) and torch.equal(kv.cpu(), want)
    assert torch.equal(kpm, before) and kpm.dtype == torch.bool


def test_cpu_tensors_outside_interpreter_use_torch(monkeypatch):
    """CPU tensors where no Triton kernel can run (interpreter off): the torch ops, same numbers."""
    kpm = _masks(2, 20, seed=4)["left"]
    monkeypatch.setattr(A, "INTERPRET", False)

    def no_kernel(*_a, **_k):
        raise AssertionError("kernel launched for CPU tensors outside the interpreter")

    monkeypatch.setattr(A, "kv_range", no_kernel)
    _, kv = A._kpm_args(kpm, torch.empty(2, 1, 1, 1), 20)
    assert torch.equal(kv, A.kv_range_torch(kpm))


# ---- compile facts (no GPU) ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["installed", "3.6"])
def test_kv_range_kernel_compiles_without_spills(version):
    env = aot_env(version)
    proc = subprocess.run([sys.executable, "-m", "aot.kv_range", "--jobs", "1"], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines and "triton" in lines[0], f"aot.kv_range produced nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    head, rows = lines[0], lines[1:]
    if version == "3.6":
        assert head["triton"] == "3.6.0"
    sys.path.insert(0, str(ROOT / "tests"))
    from aot import common

    assert len(rows) == head["jobs"] == 4
    assert {(r["arch"], r["align"]) for r in rows} == {(a, al) for a in (80, 90) for al in ("aligned", "unaligned")}
    bad = sorted(f"{common.describe(r)}: {'; '.join(common.problems(r))}" for r in rows if common.problems(r))
    assert not bad, "\n".join(bad)
    assert all(r["stack"] == 0 and r["spill"] == 0 for r in rows)
