"""Settings of the benchmark suites (bench/).

Run:  python -m pytest -q bench --benchmark-json=bench/results/cpu-latest.json
      python -m pytest -q bench -m gpu ...        (only the GPU cases; they skip without CUDA)
      python -m pytest -q bench -k "cpu/attn"     (one family)

Each benchmark warms up (compiles, autotunes), estimates one call, then times as many rounds as
fit ``--bench-seconds`` (default 1.0 s on the CPU, 0.25 s on a GPU; env FASTATTN_BENCH_SECONDS sets
both), at least ``--bench-min-rounds``. pytest-benchmark's own calibration is not used (every
benchmark runs through ``benchmark.pedantic``), so its --benchmark-min-rounds / --benchmark-max-time
have no effect here; --benchmark-disable runs each case once as a smoke test.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("fastattn-bench")
    env_s = os.environ.get("FASTATTN_BENCH_SECONDS")
    g.addoption("--bench-seconds", type=float, default=float(env_s) if env_s else None,
                help="timed seconds per benchmark (default 1.0 on CPU, 0.25 on GPU)")
    g.addoption("--bench-min-rounds", type=int, default=common.SETTINGS.min_rounds,
                help="at least this many timed rounds per benchmark")
    g.addoption("--bench-warmup", type=int, default=common.SETTINGS.warmup,
                help="untimed calls before timing (the first compiles / autotunes)")
    env_t = os.environ.get("FASTATTN_BENCH_THREADS")
    g.addoption("--bench-threads", type=int, default=int(env_t) if env_t else None,
                help="torch intra-op threads for the whole run (default: torch's; env FASTATTN_BENCH_THREADS). "
                     "On a shared machine 1 thread with --benchmark-timer=time.process_time measures CPU "
                     "time, which other processes' load barely changes")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skips cleanly without one)")
    # torch's own modules warn about its deprecated jit decorators on import; not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    s = common.SETTINGS
    seconds = config.getoption("--bench-seconds", default=None)
    if seconds is not None:
        s.seconds_cpu = s.seconds_gpu = seconds
    s.min_rounds = config.getoption("--bench-min-rounds", default=s.min_rounds)
    s.warmup = config.getoption("--bench-warmup", default=s.warmup)
    threads = config.getoption("--bench-threads", default=None)
    if threads:
        torch.set_num_threads(threads)
    # Every compiled peer recompiles per case (static shapes); dynamo's default limit is 8.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    # Show the columns that matter for a per-call time (pytest-benchmark reads this after us).
    if hasattr(config.option, "benchmark_columns") and \
            not any(a.startswith("--benchmark-columns") for a in config.invocation_params.args):
        config.option.benchmark_columns = ["min", "median", "iqr", "rounds", "iterations"]


def pytest_report_header(config):
    lines = [f"fastattn bench: torch {torch.__version__}, triton {common.triton_version()}, "
             f"{torch.get_num_threads()} threads, CPU {common.cpu_model()}"]
    if common.cuda_ok():
        lines.append(f"fastattn bench: GPU {torch.cuda.get_device_name()}")
    else:
        lines.append("fastattn bench: no CUDA device: GPU cases skip")
    err = common.fastattn_error()
    if err:
        lines.append(f"fastattn bench: fastattn does not import ({err}): only the peers run")
    else:
        lines.append(f"fastattn bench: fastattn backends timed: cpu {common.fastattn_backends('cpu')}"
                     + (f", gpu {common.fastattn_backends('cuda')}" if common.cuda_ok() else ""))
    if os.environ.get("TRITON_INTERPRET") == "1":
        lines.append("fastattn bench: TRITON_INTERPRET=1: the triton backend is not timed")
    s = common.SETTINGS
    lines.append(f"fastattn bench: {s.seconds_cpu:g} s/benchmark on CPU, {s.seconds_gpu:g} s on GPU, "
                 f">= {s.min_rounds} rounds, {s.warmup} warm-up calls")
    return lines


def pytest_collection_modifyitems(config, items):
    if common.cuda_ok():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
