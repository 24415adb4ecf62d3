"""What both sweeps share: the worker pool, resource usage from the cubin, the problem list."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory a block may use (A100, H100)


def resource_usage(cubin: bytes) -> dict:
    """{"regs", "stack"} of a cubin (stack = stack frame + local memory bytes: spills)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}
    if "REG" not in found:
        raise RuntimeError(f"cannot read resource usage from cuobjdump output:\n{out}")
    return {"regs": found["REG"], "stack": found.get("STACK", 0) + found.get("LOCAL", 0)}


def compile_source(src, arch: int, num_warps: int, num_stages: int | None) -> dict:
    """Compile for sm_<arch>; {"regs", "stack", "spill" (ptxas' own count when it ran), "smem"}."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    row = resource_usage(k.asm["cubin"])
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", buf.getvalue())
    row["spill"] = int(m.group(1)) + int(m.group(2)) if m else 0
    row["smem"] = int(k.metadata.shared)
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled row (empty: fine)."""
    if row.get("error"):
        return [f"does not compile: {row['error']}"]
    bad = []
    if row["smem"] > SMEM_LIMIT[row["arch"]]:
        bad.append(f"shared memory {row['smem']} B > {SMEM_LIMIT[row['arch']]} B")
    if row["spill"] or row["stack"]:
        bad.append(f"spills: {row['stack']} B of stack ({row['spill']} B ptxas spill traffic), {row['regs']} registers")
    return bad


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its waited children (ptxas, cuobjdump)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(args):
    fn, job = args
    t0, c0 = time.time(), _cpu_seconds()
    row = dict(job)
    try:
        row.update(fn(job))
    except Exception as exc:  # reported as a failed row
        text = f"{type(exc).__name__}: {exc}".strip()
        row["error"] = text.splitlines()[0][:300] if text else type(exc).__name__
    row["seconds"] = round(time.time() - t0, 2)  # wall: grows with the machine's load
    row["cpu"] = round(_cpu_seconds() - c0, 2)    # CPU: the comparable cost of the job
    peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    row["peak_mb"] = peak // 1024                 # the worker's (or a ptxas') peak so far, in MB
    return row


def main(description: str, all_jobs, compile_job, argv=None) -> int:
    """The command line of a sweep: prints {"triton", "jobs"} then one JSON row per job."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    import triton

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="compile processes")
    p.add_argument("--filter", default=None, help="only jobs whose description contains this")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--all-dtypes", action="store_true", default=os.environ.get("FASTATTN_AOT_ALL_DTYPES") == "1",
                   help="also the bf16 twins of fp16 jobs a sweep leaves out (attention; FASTATTN_AOT_ALL_DTYPES=1)")
    a = p.parse_args(argv)
    jobs = [j for j in all_jobs(a.all_dtypes) if not a.filter or a.filter in describe(j)]
    print(json.dumps({"triton": triton.__version__, "jobs": len(jobs)}), flush=True)
    rows = []
    with mp.get_context("fork").Pool(max(1, a.jobs)) as pool:
        for row in pool.imap_unordered(_timed, [(compile_job, j) for j in jobs], chunksize=1):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=0)
    bad = [r for r in rows if problems(r)]
    print(f"{len(rows)} compiled with triton {triton.__version__}, {len(bad)} failing", file=sys.stderr)
    return 1 if bad else 0


def describe(row: dict) -> str:
    keys = ("kernel", "dtype", "dc", "hd", "variant", "spec", "align", "tile", "arch")
    return " ".join(f"sm_{row[k]}" if k == "arch" else (f"hd{row[k]}" if k == "hd" else str(row[k]))
                    for k in keys if row.get(k) is not None)
