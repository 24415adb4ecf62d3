"""bench/gpu_check.sh, the device check, on a machine without a GPU: it must finish in seconds with a
clear "no CUDA device" record, its quick plan must fit the 9-minute device window, and its step
machinery (budgets, records, logs written as it goes) must work."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def run_script(*args, env=None, timeout=120):
    full_env = dict(os.environ, PYTHON=sys.executable)
    full_env.pop("FASTATTN_GPU_CHECK_ASSUME_GPU", None)
    full_env.update(env or {})
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def plan(*args) -> dict[str, int]:
    r = run_script("--plan", *args)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("step budget_s"), r.stdout
    steps = {name: int(sec) for name, sec in (line.split() for line in lines[1:])}
    return steps


def test_quick_plan_fits_nine_minutes():
    steps = plan()
    total = steps.pop("total")
    assert sum(steps.values()) == total
    assert total <= 540, f"the quick device check's budgets add up to {total} s; the device window is 540 s"
    expected = ["preflight", "build", "conformance", "tc-crosscheck", "gpu-tests", "sanitize", "speed", "report"]
    assert list(steps) == expected
    assert all(sec > 0 for sec in steps.values()), steps


def test_full_plan_is_longer_and_adds_the_benchmark_suites():
    quick, full = plan(), plan("--full")
    assert full["total"] > quick["total"]
    assert "bench-suites" in full and "bench-suites" not in quick


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the record of a machine without a CUDA device")
def test_no_cuda_device_is_recorded_in_seconds(tmp_path):
    out = tmp_path / "results"
    t0 = time.monotonic()
    r = run_script("--out", str(out))
    elapsed = time.monotonic() - t0
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    assert elapsed < 60, f"took {elapsed:.0f} s without a GPU"
    status = (out / "status.md").read_text()
    assert re.search(r"^\| preflight \| no CUDA device \|", status, re.M), status
    assert re.search(r"^\| total \| no CUDA device \|", status, re.M), status
    assert (out / "NO_CUDA_DEVICE").exists()
    assert "no CUDA device" in r.stdout
    # nothing else ran: no build or test logs
    assert sorted(p.name for p in out.iterdir()) == ["NO_CUDA_DEVICE", "status.md"]


def test_results_folder_from_the_environment(tmp_path):
    out = tmp_path / "from-env"
    r = run_script(env={"FASTATTN_GPU_RESULTS": str(out)})
    assert (out / "status.md").exists(), (r.stdout, r.stderr)


def test_bad_arguments_name_themselves(tmp_path):
    r = run_script("--bogus")
    assert r.returncode == 2 and "'--bogus'" in r.stderr, r.stderr
    r = run_script("nosuchstep", "--out", str(tmp_path))
    assert r.returncode == 2 and "'nosuchstep'" in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="exercises the step machinery where GPU steps skip")
def test_steps_record_as_they_go(tmp_path):
    """With a GPU assumed, steps run: the tensor-core cross-check skips cleanly without CUDA, a missing
    compute-sanitizer is "not available" (not FAILED), and each step leaves its row and log."""
    out = tmp_path / "results"
    # --full: its long budgets keep a loaded CI machine from hitting a step's limit
    r = run_script("--full", "tc-crosscheck", "sanitize", "report", "--out", str(out),
                   env={"FASTATTN_GPU_CHECK_ASSUME_GPU": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    status = (out / "status.md").read_text()
    assert f"tc-crosscheck: budget {plan('--full')['tc-crosscheck']} s" in r.stdout and "s left of" in r.stdout, r.stdout
    assert re.search(r"^\| tc-crosscheck \| ok \|.*skipped", status, re.M), status
    assert re.search(r"^\| sanitize \| not available \|", status, re.M), status
    assert re.search(r"^\| report \| ok \|", status, re.M), status
    assert (out / "tc-crosscheck.log").exists() and (out / "tc-crosscheck.xml").exists()
    # pytest's output is streamed to stdout as well as the log
    assert "skipped" in r.stdout
    assert "| tc-crosscheck | ok |" in (out / "report.md").read_text()
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_speed_table_runs_both_triton_kernel_sets_in_one_process():
    """bench/gpu_speed.py times the sm_90 and the classic Triton kernels on the same inputs: one column
    each, the runner switching FASTATTN_TRITON_ATTN's mode in-process before each call."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "bench" / "gpu_speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    assert {"triton sm90", "triton classic"} <= set(speed.IMPLS)
    run = speed.runners()
    attention_sm90 = speed.sm90_module()
    old = attention_sm90.MODE
    calls = []
    try:
        import fastattn

        real = fastattn.scaled_dot_product_attention
        fastattn.scaled_dot_product_attention = lambda *a, **kw: calls.append((attention_sm90.MODE, kw["backend"]))
        q = torch.zeros(1, 1, 4, 8)
        run["triton classic"](q, q, q, False)
        run["triton sm90"](q, q, q, True)
    finally:
        fastattn.scaled_dot_product_attention = real
        attention_sm90.use_mode(old)
    assert calls == [("classic", "triton"), ("sm90", "triton")]


def test_speed_table_runs_the_small_path_beside_the_classic_one():
    """The "triton small" column runs with kernels/attention_small.py on, the sm90 and classic columns
    with it off (one process, switched before each call), so small / classic compares the two."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "bench" / "gpu_speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    assert "triton small" in speed.IMPLS
    run = speed.runners()
    small, sm90 = speed.small_module(), speed.sm90_module()
    old = (small.ENABLED, sm90.MODE)
    calls = []
    try:
        import fastattn

        real = fastattn.scaled_dot_product_attention
        fastattn.scaled_dot_product_attention = lambda *a, **kw: calls.append((small.ENABLED, sm90.MODE))
        q = torch.zeros(1, 1, 4, 8)
        for name in ("triton small", "triton sm90", "triton classic"):
            run[name](q, q, q, False)
    finally:
        fastattn.scaled_dot_product_attention = real
        small.use_small(old[0])
        sm90.use_mode(old[1])
    assert calls == [(True, "sm90"), (False, "sm90"), (False, "classic")]
