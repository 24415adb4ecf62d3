"""Ahead-of-time compilation of kernels/attention_sm90.py's forward for sm_90, without a GPU.

Every case of attention_sm90.compile_cases() (head-dim bucket x config x TMA/plain loads) is
compiled for fp16 and bf16 with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)),
using whatever triton the interpreter imports (PYTHONPATH picks another version), and reported with
its registers, shared memory, spills and what the PTX issues (wgmma.mma_async, cp.async.bulk.tensor,
the wgmma.wait_group depths). Used by tests/test_triton_sm90_attention.py; by hand:
    python -m aot.sm90 --jobs 2 [--json out.json] [--warp-spec]   (from tests/)
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import sys
import time


def compile_one(args) -> dict:
    index, dtype, warp_spec = args
    import triton
    from triton.backends.compiler import GPUTarget

    from fastattn.kernels import attention_sm90 as S

    from .attention import signature
    from .common import resource_usage
    from .compat import make_ast_source

    hd, cfg, use_tma = S.compile_cases()[index]
    constexprs = S.case_constexprs(hd, cfg, use_tma, warp_spec)
    types, divisible = signature(S._attn_fwd_sm90_kernel, dtype, constexprs)
    row = dict(triton=triton.__version__, dtype=dtype, head_dim=hd,
               loads="tma" if use_tma else "plain",
               config=f"BM{cfg.kwargs['BLOCK_M']}/BN{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}",
               warp_spec=warp_spec, error=None)
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(make_ast_source(S._attn_fwd_sm90_kernel, types, constexprs, divisible),
                               target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    except Exception as exc:  # reported as a failed row; the test asserts on it
        msg = str(exc).strip().splitlines()
        row["error"] = f"{type(exc).__name__}: {msg[0] if msg else ''}"
        return row
    ptx = k.asm["ptx"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    meta = k.metadata
    row["smem"] = int(meta.shared if hasattr(meta, "shared") else meta["shared"])
    log = buf.getvalue()
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if m:
        row["spill_stores"], row["spill_loads"] = int(m.group(1)), int(m.group(2))
    row.update(resource_usage(k.asm["cubin"]))  # {"regs", "stack" (stack frame + local memory)}
    row["wgmma"] = ptx.count("wgmma.mma_async")
    row["tma_loads"] = len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.shared::\w+\.global", ptx))
    row["tma_stores"] = len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::\w+", ptx))
    row["wait_groups"] = sorted({int(m) for m in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)})
    row["mma_sync"] = ptx.count("mma.sync")
    return row


def all_jobs(warp_spec=False):
    from fastattn.kernels import attention_sm90 as S

    return [(i, dt, warp_spec) for i in range(len(S.compile_cases())) for dt in ("f16", "bf16")]


def format_table(rows) -> str:
    lines = ["triton dtype hd  loads  config            regs  smem    spills wgmma tma_ld tma_st wait  error"]
    for r in rows:
        lines.append(f"{r['triton']:6} {r['dtype']:5} {r['head_dim']:<3} {r['loads']:6} {r['config']:17} "
                     f"{r.get('regs')!s:5} {r.get('smem')!s:7} {r.get('stack', 0) + r.get('local', 0) + r.get('spill_stores', 0):<6} "
                     f"{r.get('wgmma')!s:5} {r.get('tma_loads')!s:6} {r.get('tma_stores')!s:6} "
                     f"{r.get('wait_groups')!s:5} {r['error'] or ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--warp-spec", action="store_true")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    jobs = all_jobs(args.warp_spec)
    with multiprocessing.get_context("spawn").Pool(max(1, args.jobs)) as pool:
        rows = pool.map(compile_one, jobs, chunksize=1)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
