"""Ahead-of-time compilation of every Triton tile fastattn can launch, for sm_80 and sm_90,
with the triton of this environment and with triton 3.6.0 (the GPU machines' version), without a GPU.

For each (sweep, triton) pair, tests/aot (python -m aot.attention / aot.ffn) compiles in a child
process every tile kernels/configs.py can return (attention: kernel x dtype class x head-dim bucket x
mask/dropout specialisation; feed-forward: kernel x dtype x alignment x operand layout) and the test
asserts, per compiled kernel: it compiled, shared memory fits the chip (A100 163 KB, H100 227 KB),
ptxas reports no spills and the cubin has no stack frame. The table tile of a key must pass on both
versions (or, for the keys kernels/configs.py's _ATTN_BY_TRITON names, each version's own tile on
that version): that is the record of why the tables are what they are.

Cost (a cold make test on a 2-core machine): the first of these tests starts every sweep the session
selected, all four at once (their compile processes share the cores twice over, so the versions'
and families' compiles overlap and no core idles behind one sweep's last slow kernel); the others
collect theirs. The
attention sweep compiles the f16 class as fp16 only: bf16 runs the same kernel code except the
element type of loads, of the P/dS casts before tl.dot and of the mma operands, which have the same
instruction shapes on sm_80/sm_90 (tests/aot/attention.py says why); measured 2026-11-30 with both
versions, every fp16 row and its bf16 twin had the same verdict, stack and shared memory.
FASTATTN_AOT_ALL_DTYPES=1 compiles the bf16 twins too (do that after changing the kernels). The
feed-forward sweep keeps bf16: its epilogues differ from fp16 by up to 25 registers. Each row carries
its CPU seconds (the compile's own and its ptxas'), the figure to compare between runs on a shared
machine; the test prints the sums.

triton 3.6.0 lives in .triton36 (`make test` installs it: pip install --target .triton36 --no-deps
triton==3.6.0; torch is not duplicated) and is put first on the child's PYTHONPATH. FASTATTN_AOT_JOBS
sets each child's compile processes (default: twice the cores over the sweeps started together, at
least 2); FASTATTN_AOT_FILTER=<substring of a row> compiles only a part, by hand. Without .triton36
the 3.6 cases skip, naming the command.
"""
from __future__ import annotations

import atexit
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest

from aot import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRITON36 = ROOT / ".triton36"
SWEEPS = ("attention", "ffn")


# Known gap: none (issue 13 closed it, 2026-11-30). The test still names expected rows here if a gap is
# ever accepted again: a sweep whose only failing rows are these is an expected failure naming them; any
# other failing row fails the test.
# What the gap was, for whoever meets a stack frame next. Two kinds, both with 0 B of ptxas spill
# traffic. (1) 8-40 B at a low register count: ptxas ends each loop with a CALL.REL.NOINC to the code
# after it and keeps in a stack frame, across the loops, values computed before them and used only
# after them (a mask such as the forward's m_ok, dK/dV's key_ok/n_ok, a 64-bit output offset, the delta
# pre-pass's row pointers and `big` predicates packed with P2R); which values, and whether, varies with
# the tile and the version. Fixed by another tile (28 table rows re-chosen), or in the kernel by leaving
# nothing live after the loop (the delta pre-pass's split rows store after every key block; a value can
# also be recomputed after the loops: forward tf32 hd64 mask 32x32 w8 s2 on 3.6, m_ok recomputed as
# (offs_m - L) < 0, 8 B -> 0). (2) At 255 registers: pressure, dK/dV hd256 fp32 mask+drop on sm_80,
# where no tile is clean on both versions (tried: 16x16 w4/w8/w16 s1, 16x16 w4/w8 s2, 16x32 w4/w8 s1,
# 32x16 w4/w8 s1, 32x32 w8 s1); kernels/configs.py's _ATTN_BY_TRITON gives 3.6 its own clean tile.
KNOWN_GAP: set = set()

_RUNNING: dict = {}  # (family, version) -> (Popen, stdout file, stderr file, start time)


@atexit.register
def _stop_unfinished() -> None:
    """A session that ends early (-x, Ctrl-C) leaves no sweep compiling behind it."""
    for proc, *_ in _RUNNING.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _env(version: str) -> dict | None:
    """The child's environment for a triton version; None when that version is not installed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile real cubins
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9 warns when unset; 1 is 3.6's and 3.9's default
    if version == "3.6":
        if not (TRITON36 / "triton").is_dir():
            return None
        env["PYTHONPATH"] = os.pathsep.join([str(TRITON36)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _start(family: str, version: str, together: int) -> None:
    env = _env(version)
    if env is None or (family, version) in _RUNNING:
        return
    # the `together` sweeps share the cores, twice over (up to ~0.65 GB per compile process, measured)
    jobs = os.environ.get("FASTATTN_AOT_JOBS", str(max(2, -(-2 * (os.cpu_count() or 2) // together))))
    only = os.environ.get("FASTATTN_AOT_FILTER")  # by hand: a part of the sweep (a substring of a row)
    # output to files, not pipes: a child nobody reads yet must never block on a full pipe
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", f"aot.{family}", "--jobs", jobs] +
                            (["--filter", only] if only else []), cwd=ROOT / "tests", env=env, stdout=out,
                            stderr=err, text=True)
    _RUNNING[family, version] = (proc, out, err, time.time())


def _sweep(family: str, version: str, selected) -> tuple[dict, list[dict], float]:
    """One sweep's (head, rows, wall seconds). The first call starts every sweep this session selected,
    all at once, sharing the cores: the versions' and families' compiles overlap, so a 2-core machine
    is never left with a core idle behind one sweep's last slow kernel."""
    if _env(version) is None:
        pytest.skip("triton 3.6.0 is not in .triton36 (make test installs it: "
                    "pip install --target .triton36 --no-deps triton==3.6.0)")
    for f, v in selected:
        _start(f, v, len(selected))
    proc, out, err, t0 = _RUNNING[family, version]
    try:
        proc.wait(timeout=max(1.0, 3600 - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    err.seek(0)
    lines = [json.loads(x) for x in out.read().splitlines() if x.startswith("{")]
    if not lines or "triton" not in lines[0]:
        pytest.fail(f"aot.{family} produced nothing (rc {proc.returncode}):\n{err.read()[-4000:]}")
    return lines[0], lines[1:], time.time() - t0


@pytest.fixture
def selected(request) -> list:
    """The (family, version) cases of this test that the session runs (the current one included); only
    the current one under pytest-xdist, whose workers each see every item but run a share."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return [(request.node.callspec.params["family"], request.node.callspec.params["version"])]
    here = [(i.callspec.params["family"], i.callspec.params["version"]) for i in request.session.items
            if getattr(i, "originalname", None) == request.node.originalname and hasattr(i, "callspec")]
    return here or [(request.node.callspec.params["family"], request.node.callspec.params["version"])]


@pytest.mark.parametrize("version", ["installed", "3.6"])
@pytest.mark.parametrize("family", SWEEPS)
def test_every_table_tile_compiles_without_spills(family, version, selected):
    head, rows, seconds = _sweep(family, version, selected)
    if version == "3.6":
        assert head["triton"] == "3.6.0", f"the child imported triton {head['triton']}, not .triton36's 3.6.0"
    assert len(rows) == head["jobs"] > 0, f"{len(rows)} rows for {head['jobs']} jobs"
    print(f"\n{family} sweep, triton {head['triton']}: {len(rows)} kernels in {seconds:.0f} s wall (the other "
          f"sweeps running beside it), {sum(r['cpu'] for r in rows):.0f} CPU seconds of compile "
          f"({sum(r['seconds'] for r in rows):.0f} s of job wall time), peak {max(r['peak_mb'] for r in rows)} MB "
          "in a compile process")
    assert os.environ.get("FASTATTN_AOT_FILTER") or {r["arch"] for r in rows} == {80, 90}
    bad = {common.describe(r): "; ".join(common.problems(r)) for r in rows if common.problems(r)}
    new = sorted(f"{d}: {why}" for d, why in bad.items() if d not in KNOWN_GAP)
    assert not new, (f"{len(new)} of {len(rows)} tiles fail with triton {head['triton']} (replace them in "
                     "kernels/configs.py):\n" + "\n".join(new))
    if bad:  # only rows of the named gap: an expected failure that names them, never a pass
        pytest.xfail(f"issue 13, known gap: {len(bad)} table tile(s) with a stack frame on triton "
                     f"{head['triton']}: " + "; ".join(f"{d}: {why}" for d, why in sorted(bad.items())))
