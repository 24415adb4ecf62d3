"""Ahead-of-time compilation of the attention kernels for sm_80 / sm_90, without a GPU or driver.

Used by tests/test_triton_aot_attention.py (and runnable by hand):

    python -m kernels._attn_aot [--arch 80 90] [--jobs 2] [--filter fwd] [--json out.json]

Each case of kernels.attention.compile_cases() is compiled with
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
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # bytes of shared memory a block may use (A100, H100)

_PTR_TYPES = {"f16": "*fp16", "bf16": "*bf16", "f32": "*fp32"}
_FLOAT_ARGS = {"dropout_p", "qk_scale", "sm_scale"}
_F32_PTRS = {"Lse", "Delta"}
_DATA_PTRS = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV", "Mask"}


def _signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """(signature {name: type}, attrs {(index,): [[attr, value]]}) for one kernel and element type.

    Integer arguments are typed i32 as the JIT types values that fit, except the Philox seed (i64:
    seeds are drawn from [0, 2**62)). Pointers and the head-dim/row-length integers carry the
    16-divisibility the JIT infers for aligned tensors and head dims that are multiples of 16."""
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _F32_PTRS:
            sig[name] = "*fp32"
        elif name == "Kpm":
            sig[name] = "*u8"
        elif name == "KvRange":
            sig[name] = "*i32"
        elif name in _DATA_PTRS:
            sig[name] = _PTR_TYPES[dtype]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") and name not in ("Kpm",):
            attrs[(i,)] = [["tt.divisibility", 16]]
        if name in ("HEAD_D", "HEAD_DV", "stride_ml", "S", "L"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def make_source(kernel, signature: dict, constexprs: dict, attrs: dict):
    """triton.compiler.ASTSource across triton 3.6..3.9: signature keyed by argument name with
    constexprs typed "constexpr", constexprs and attrs keyed by index path ((i,))."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        # Index-path keys: every 3.x spelling with `constexprs` accepts them (3.9 also takes names).
        paths = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
        return ASTSource(fn=kernel, signature=signature, constexprs=paths, attrs=attrs)
    # Older spelling (constants=..., index-keyed): kept so the shim fails loudly rather than silently.
    idx = {n: i for i, n in enumerate(kernel.arg_names)}
    return ASTSource(fn=kernel, signature={idx[k]: v for k, v in signature.items() if v != "constexpr"},
                     constants={idx[k]: v for k, v in constexprs.items()}, attrs=attrs)


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
    from kernels.attention import input_precision  # noqa: F401 (import path set by the caller)

    c = dict(cfg.kwargs)
    if name == "bwd_delta":
        c["BLOCK_DV"] = block_d
        return c
    has_mask, has_kpm, causal, dropout = spec
    c.update(BLOCK_D=block_d, BLOCK_DV=block_d, HAS_MASK=has_mask, HAS_KPM=has_kpm, IS_CAUSAL=causal,
             HAS_DROPOUT=dropout, INPUT_PRECISION="ieee" if dc == "f32" else "tf32")
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
    sig, attrs = _signature(kernel, dtype, constexprs)
    src = make_source(kernel, sig, constexprs, attrs)
    row = dict(kernel=name, dtype="tf32" if dc == "tf32" else dtype, dtype_class=dc, head_dim=hd, arch=arch,
               spec="-" if spec is None else "".join(t for t, on in zip(("mask", "kpm", "causal", "drop"), spec) if on)
               or "plain",
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


# The heaviest specialisation of each config-table variant: the most code, registers and loads.
HEAVIEST = {"plain": (False, True, True, False), "mask": (True, True, True, False),
            "dropout": (True, True, True, True)}


def ci_jobs(archs=(80, 90)) -> list:
    """The subset `make test` compiles on a 2-core CI machine: for every kernel and arch, every config
    the fp16 tables hold for head-dim buckets 64, 128 and 256, each with the heaviest specialisation
    of its variant (plain: kpm + causal; mask: + attn_mask; dropout: all four), fp32 (ieee) and tf32
    at hd 64, plus the delta pre-pass. all_jobs() is the full
    cross product (every dtype, bucket and specialisation), run with FASTATTN_AOT_FULL=1."""
    from kernels import attention as A

    jobs = []
    for i, (name, _k, dc, hd, spec, cfg) in enumerate(A.compile_cases()):
        if spec is None:
            dtypes = ("f16",) if dc == "f16" else ()
        elif spec != HEAVIEST[A.variant(spec)]:
            continue
        elif dc == "f16" and hd in (64, 128, 256):
            dtypes = ("f16",)  # bf16 compiles to the same registers/smem (checked in the full run)
        elif dc in ("f32", "tf32") and hd == 64:
            dtypes = ("f32",)
        else:
            continue
        for arch in (a for a in archs if A.arch_family(a) in A.config_archs(cfg)):
            for dt in dtypes:
                jobs.append((i, arch, dt))
    return jobs


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
    p.add_argument("--subset", choices=("ci", "full"), default="full")
    p.add_argument("--json", default=None)
    p.add_argument("--verbose", action="store_true", help="print each row as it finishes")
    a = p.parse_args(argv)
    jobs = all_jobs(tuple(a.arch), a.filter) if a.subset == "full" else ci_jobs(tuple(a.arch))
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
