"""Peak memory of the CPU attention forward: no L x S matrix, ever.

N=1, H=1, L=S=16384, E=64, float32: inputs and output are 4 MiB each, a score matrix would be
1 GiB. Each measurement runs in a fresh subprocess: it builds the inputs, warms the kernel up on a
small shape (thread pools, lazy library state), resets the kernel's peak-RSS counter through
/proc/self/clear_refs, runs the call and reads VmHWM from /proc/self/status. The harness is checked
against a control that does allocate an L x S matrix, so it is shown able to fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
LIMIT = 64 * MiB

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                                reason="needs Linux /proc/self/clear_refs to reset the peak RSS")

_CHILD = r"""
import glob, json, math, os, sys
import torch
try:
    import fastattn._C  # noqa: F401
except Exception:
    torch.ops.load_library(glob.glob(os.path.join(sys.argv[2], "fastattn", "_C*.so"))[0])

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

torch.set_num_threads(2)
n, h, l, e = 1, 1, 16384, 64
q, k, v = (torch.randn(n, h, l, e) for _ in range(3))
what = sys.argv[1]
small = torch.randn(1, 1, 64, e)
if what == "fastattn":
    run = lambda: torch.ops.fastattn.attention_fwd(q, k, v, None, None, 0.0, False, 1 / math.sqrt(e), None)
    torch.ops.fastattn.attention_fwd(small, small, small, None, None, 0.0, False, 0.125, None)
else:  # control: materialises the L x S score matrix
    run = lambda: (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e), -1) @ v, None)
    run_small = (torch.softmax(small @ small.transpose(-1, -2), -1) @ small)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = status("VmRSS")
reset_ok = status("VmHWM") <= before + 4 * 1024 * 1024
out, lse = run()
peak = status("VmHWM")
print(json.dumps({"before": before, "peak": peak, "reset_ok": reset_ok,
                  "out_bytes": out.numel() * out.element_size(),
                  "lse_bytes": 0 if lse is None else lse.numel() * lse.element_size()}))
"""


def _measure(what):
    proc = subprocess.run([sys.executable, "-c", _CHILD, what, ROOT], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["reset_ok"], f"/proc/self/clear_refs did not reset VmHWM: {res}"
    return res


def test_forward_peak_memory_has_no_score_matrix():
    res = _measure("fastattn")
    extra = res["peak"] - res["before"] - res["out_bytes"] - res["lse_bytes"]
    assert extra < LIMIT, (f"forward at L=S=16384 E=64 peaked {extra / MiB:.1f} MiB above inputs and output "
                           f"(limit {LIMIT / MiB:.0f} MiB): {res}")


def test_harness_sees_a_score_matrix():
    # the same measurement of a computation that does build the 1 GiB L x S matrix must exceed the limit
    res = _measure("control")
    extra = res["peak"] - res["before"] - res["out_bytes"]
    assert extra > 1024 * MiB - 1, f"control peaked only {extra / MiB:.1f} MiB: the harness cannot see an L x S matrix"
