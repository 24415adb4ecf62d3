"""Candidate tiles for one attention table key, compiled with both triton versions (a tuning aid).

    cd tests && nice ../.venv/bin/python -m aot.search_tiles "bwd_dkdv f32 32 drop 80" \
        [--tiles "16x32 w8 s1,32x32 w4 s1"] [--jobs 2]

A key is "kernel dtype head-dim variant arch" (dtype f16, bf16, f32 or tf32; variant plain, mask,
drop or mask+drop; arch 80 or 90). Without --tiles the candidates are BLOCK_M x BLOCK_N in
{16, 32, 64}, 2/4/8 warps, 1 or 2 stages (1 only for bwd_dkdv). Several keys may be given; --rows
takes exact sweep rows instead ("bwd_dkdv f32 hd32 drop 16x16 w4 s1 sm_80"). Each version compiles in
its own child (triton 3.6 from .triton36 first on PYTHONPATH), --jobs processes each; the table
printed per row: verdict, stack, registers, shared memory on 3.9 (installed) and 3.6.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import pathlib
import subprocess
import sys

from . import common
from .attention import compile_job

ROOT = pathlib.Path(__file__).resolve().parents[2]


def candidates(kernel: str) -> list[str]:
    stages = (1,) if kernel == "bwd_dkdv" else (1, 2)
    return [f"{m}x{n} w{w} s{s}" for m, n, w, s in itertools.product((16, 32, 64), (16, 32, 64), (2, 4, 8), stages)]


def key_jobs(key: str, tiles: list[str] | None) -> list[dict]:
    kernel, dtype, hd, var, arch = key.split()
    return [dict(kernel=kernel, dtype=dtype, hd=int(hd.removeprefix("hd")), variant=var, tile=t,
                 arch=int(arch.removeprefix("sm_"))) for t in (tiles or candidates(kernel))]


def row_job(row: str) -> dict:
    p = row.split()
    return dict(kernel=p[0], dtype=p[1], hd=int(p[2][2:]), variant=p[3], tile=" ".join(p[4:7]), arch=int(p[7][3:]))


def _worker(jobs: list[dict], n: int) -> None:
    with mp.get_context("fork").Pool(max(1, n)) as pool:
        for row in pool.imap_unordered(common._timed, [(compile_job, j) for j in jobs], chunksize=1):
            print(json.dumps(row), flush=True)


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        return "ERROR " + r["error"][:40]
    ok = "ok " if not common.problems(r) else "BAD"
    return f"{ok} st{r['stack']:<3} r{r['regs']:<3} sm{r['smem'] // 1024}K"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("keys", nargs="*")
    p.add_argument("--tiles", default=None, help="comma-separated candidate tiles")
    p.add_argument("--rows", default=None, help="comma-separated exact sweep rows")
    p.add_argument("--jobs", type=int, default=1, help="compile processes per version")
    p.add_argument("--versions", default="3.9,3.6")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        _worker(json.loads(a.worker), a.jobs)
        return 0
    tiles = [t.strip() for t in a.tiles.split(",")] if a.tiles else None
    jobs = [j for k in a.keys for j in key_jobs(k, tiles)]
    jobs += [row_job(r.strip()) for r in (a.rows.split(",") if a.rows else [])]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {}
    for v in a.versions.split(","):
        e = dict(env)
        if v == "3.6":
            e["PYTHONPATH"] = os.pathsep.join([str(ROOT / ".triton36")] + [x for x in [env.get("PYTHONPATH")] if x])
        procs[v] = subprocess.Popen([sys.executable, "-m", "aot.search_tiles", "--worker", json.dumps(jobs),
                                     "--jobs", str(a.jobs)], cwd=ROOT / "tests", env=e, stdout=subprocess.PIPE,
                                    text=True)
    results = {}
    for v, proc in procs.items():
        out, _ = proc.communicate()
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[v, common.describe(r)] = r
    for j in jobs:
        d = common.describe(j)
        cells = "  |  ".join(f"{v}: {_cell(results.get((v, d)))}" for v in procs)
        clean = all(results.get((v, d)) and not common.problems(results[v, d]) for v in procs)
        print(f"{'CLEAN' if clean else '     '} {d:<50} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
