"""Ahead-of-time compilation of the attention kernels for sm_80 / sm_90, without a GPU or driver.

Used by tests/test_triton_aot_attention.py (and runnable by hand):

    python -m kernels._attn_aot [--arch 80 90] [--jobs 2] [--filter fwd] [--sample N] [--json out.json]

all_jobs() is the full cross product: every kernel x dtype (fp16, bf16, fp32 as ieee and as tf32)
x head-dim bucket x mask/kpm/dropout specialisation x config x arch; `make test` compiles all of it
(tests/test_triton_aot_attention.py). Each case of kernels.attention.compile_cases() is compiled with
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))``.
Registers, spills and stack come from the cubin (``cuobjdump --dump-resource-usage``, the tool ships
in the triton wheel) and, when ptxas ran in this process, from ptxas' own ``-v`` report; shared
memory from ``compiled.metadata.shared``.

The Triton interpreter must be off: with TRITON_INTERPRET=1, ``triton.jit`` makes interpreted
functions that cannot be compiled, so ``run_cases`` runs the compiles in worker processes started
with the variable removed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

try:
    from ._aot_compat import make_ast_source, runtime_type
except ImportError:  # run as a script: python kernels/_attn_aot.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from kernels._aot_compat import make_ast_source, runtime_type

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory a block may use (A100, H100)

_PTR_TYPES = {"f16": "*fp16", "bf16": "*bf16", "f32": "*fp32"}
_FLOAT_ARGS = {"dropout_p", "qk_scale", "sm_scale"}
_F32_PTRS = {"Lse", "LseBase", "LseRest", "Delta", "Mask"}  # the additive mask is float32 for every dtype
_DATA_PTRS = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"}


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, list]:
    """(types {runtime argument: triton type}, names carrying 16-divisibility) for one kernel and
    element type.

    Integer arguments are typed i32 as the JIT types values that fit, except the Philox seed (i64:
    seeds are drawn from [0, 2**62)); `causal` is a bool, typed as the JIT types one (u1 on 3.9).
    Pointers and the head-dim/row-length integers carry the 16-divisibility the JIT infers for
    aligned tensors and head dims that are multiples of 16."""
    types, divisible = {}, []
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in _F32_PTRS:
            types[name] = "*fp32"
        elif name == "Kpm":
            types[name] = "*u8"
        elif name == "KvRange":
            types[name] = "*i32"
        elif name in _DATA_PTRS:
            types[name] = _PTR_TYPES[dtype]
        elif name in _FLOAT_ARGS:
            types[name] = "fp32"
        elif name == "seed":
            types[name] = "i64"
        elif name == "causal":
            types[name] = runtime_type(True)
        else:
            types[name] = "i32"
        if (types[name].startswith("*") and name != "Kpm") or name in ("HEAD_D", "HEAD_DV", "stride_ml", "S", "L"):
            divisible.append(name)
    return types, divisible


def _cuobjdump() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def _resource_usage(cubin: bytes) -> dict:
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        out = subprocess.run([tool, "--dump-resource-usage", name], capture_output=True, text=True).stdout
    finally:
        os.remove(name)
    res = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            res[key.lower()] = int(m.group(1))
    return res


def _parse_ptxas_log(log: str) -> dict:
    res = {}
    m = re.search(r"Used (\d+) registers", log)
    if m:
        res["ptxas_regs"] = int(m.group(1))
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        res["spill_stores"], res["spill_loads"] = int(m.group(1)), int(m.group(2))
    return res


def case_constexprs(name: str, block_d: int, spec, cfg, dc: str) -> dict:
    from kernels.attention import input_precision  # import path set by the caller

    c = dict(cfg.kwargs)
    has_mask, has_kpm, dropout = spec
    if name == "bwd_delta":
        c.update(BLOCK_D=block_d, BLOCK_DV=block_d, HAS_MASK=has_mask, HAS_KPM=has_kpm,
                 INPUT_PRECISION=input_precision(dc))
        return c
    c.update(BLOCK_D=block_d, BLOCK_DV=block_d, HAS_MASK=has_mask, HAS_KPM=has_kpm, HAS_DROPOUT=dropout,
             INPUT_PRECISION=input_precision(dc))
    return c


def compile_one(args) -> dict:
    """Compile case number `index` of compile_cases() for `arch`, once per element dtype of its class."""
    index, arch, dtype = args
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import attention as A

    if isinstance(index, tuple):  # an explicit (name, dc, hd, spec, cfg) case
        name, dc, hd, spec, cfg = index
        kernel = A._attn_bwd_delta_kernel if name == "bwd_delta" else A.KERNELS[name][0]
    else:
        name, kernel, dc, hd, spec, cfg = A.compile_cases()[index]
    constexprs = case_constexprs(name, hd, spec, cfg, dc)
    types, divisible = _signature(kernel, dtype, constexprs)
    src = make_ast_source(kernel, types, constexprs, divisible)
    row = dict(kernel=name, dtype="tf32" if dc == "tf32" else dtype, dtype_class=dc, head_dim=hd, arch=arch,
               spec=A.variant(spec),
               config="BM%d" % cfg.kwargs["BLOCK_M"] + ("/BN%d" % cfg.kwargs["BLOCK_N"] if "BLOCK_N" in cfg.kwargs else "")
               + f" w{cfg.num_warps} s{cfg.num_stages}" + ("" if A.config_archs(cfg) == A.ARCH_FAMILIES
                                                         else " only sm%d" % A.config_archs(cfg)[0]),
               error=None)
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as exc:  # reported as a failed row, asserted on by the test
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        return row
    meta = compiled.metadata
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["smem"] = int(meta.shared if hasattr(meta, "shared") else meta["shared"])
    row.update(_parse_ptxas_log(buf.getvalue()))
    row.update(_resource_usage(compiled.asm["cubin"]))
    row["regs"] = row.get("reg", row.get("ptxas_regs"))
    # Spill bytes: ptxas' own count when it ran here (a cached compile skips ptxas), and the cubin's
    # stack frame + local memory (these kernels have no calls or local arrays: any is a spill).
    row["spills"] = (row.get("spill_stores", 0) + row.get("spill_loads", 0)) or (row.get("stack", 0)
                                                                              + row.get("local", 0))
    return row


def _dtypes(dc: str) -> tuple[str, ...]:
    return {"f16": ("f16", "bf16"), "f32": ("f32",), "tf32": ("f32",)}[dc]


def all_jobs(archs=(80, 90), name_filter: str | None = None) -> list:
    from kernels import attention as A

    jobs = []
    for i, (name, _k, dc, _hd, _spec, cfg) in enumerate(A.compile_cases()):
        if name_filter and name_filter not in name:
            continue
        for arch in (a for a in archs if A.arch_family(a) in A.config_archs(cfg)):
            for dt in _dtypes(dc):
                jobs.append((i, arch, dt))
    return jobs


def _indexed(item):
    i, job = item
    return i, compile_one(job)


def _init_worker():
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"


def run_cases(jobs, processes: int = 2, progress=None) -> list[dict]:
    """Compile `jobs` in `processes` fresh worker processes (spawned, interpreter variable removed).
    progress(row) is called as each finishes; rows come back in job order."""
    import multiprocessing as mp

    env_before = os.environ.get("TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)  # spawned children inherit the environment at start
    try:
        ctx = mp.get_context("spawn")
        with ctx.Pool(processes, initializer=_init_worker) as pool:
            rows = [None] * len(jobs)
            for i, row in pool.imap_unordered(_indexed, list(enumerate(jobs)), chunksize=1):
                rows[i] = row
                if progress is not None:
                    progress(row)
            return rows
    finally:
        if env_before is not None:
            os.environ["TRITON_INTERPRET"] = env_before


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "dtype", "hd", "arch", "spec", "config", "regs", "smem", "spills", "error")
    lines = ["%-9s %-5s %4s %4s %-22s %-24s %5s %7s %6s %s" % head]
    for r in rows:
        lines.append("%-9s %-5s %4d %4d %-22s %-24s %5s %7s %6s %s" % (
            r["kernel"], r["dtype"], r["head_dim"], r["arch"], r["spec"], r["config"], r.get("regs", "-"),
            r.get("smem", "-"), r.get("spills", "-"), r["error"] or ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--filter", default=None, help="only kernels whose name contains this")
    p.add_argument("--limit", type=int, default=0, help="compile only the first N jobs")
    p.add_argument("--sample", type=int, default=0, help="compile N jobs drawn at random (by hand: a quick look)")
    p.add_argument("--seed", type=int, default=0, help="the random draw of --sample")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true", help="print each row as it finishes")
    a = p.parse_args(argv)
    jobs = all_jobs(tuple(a.arch), a.filter)
    if a.sample:
        import random

        jobs = sorted(random.Random(a.seed).sample(jobs, min(a.sample, len(jobs))))
    if a.limit:
        jobs = jobs[: a.limit]
    rows = run_cases(jobs, a.jobs, progress=lambda r: print(format_table([r]).splitlines()[1], flush=True)
                     if a.verbose else None)
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["error"] or r.get("spills") or r.get("smem", 0) > SMEM_LIMIT[r["arch"]]]
    print(f"{len(rows)} compiled, {len(bad)} failing", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
