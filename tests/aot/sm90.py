"""Ahead-of-time compilation of the sm_90 attention kernels for sm_90, without a GPU.

Every case of attention_sm90.compile_cases() (the forward: head-dim bucket x config x TMA/plain loads)
and of attention_sm90_bwd.compile_cases() (the backward: (head-dim bucket, variant) x its config x
TMA/plain loads) is compiled for fp16 and bf16 with triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)),
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


def _case(kind: str, index: int, warp_spec: bool):
    """(kernel, constexprs, row fields, config) of one compile case."""
    if kind == "fwd":
        from fastattn.kernels import attention_sm90 as S

        hd, cfg, use_tma = S.compile_cases()[index]
        return (S._attn_fwd_sm90_kernel, S.case_constexprs(hd, cfg, use_tma, warp_spec),
                dict(head_dim=hd, variant="plain", loads="tma" if use_tma else "plain"), cfg)
    from fastattn.kernels import attention_sm90_bwd as B

    hd, var, cfg, use_tma = B.compile_cases()[index]
    return (B._attn_bwd_sm90_kernel, B.case_constexprs(hd, var, cfg, use_tma),
            dict(head_dim=hd, variant=var, loads="tma" if use_tma else "plain"), cfg)


def compile_one(args) -> dict:
    kind, index, dtype, warp_spec = args
    import triton
    from triton.backends.compiler import GPUTarget

    from .attention import signature
    from .common import resource_usage
    from .compat import make_ast_source

    kernel, constexprs, fields, cfg = _case(kind, index, warp_spec)
    types, divisible = signature(kernel, dtype, constexprs)  # NB (the backward's batch) is an i32 there
    row = dict(triton=triton.__version__, kernel=kind, dtype=dtype, **fields,
               config=f"BM{cfg.kwargs['BLOCK_M']}/BN{cfg.kwargs['BLOCK_N']} w{cfg.num_warps} s{cfg.num_stages}",
               warp_spec=warp_spec, error=None)
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(make_ast_source(kernel, types, constexprs, divisible),
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
    row["cp_async"] = len(re.findall(r"cp\.async\.c[ag]\.", ptx))
    return row


def all_jobs(warp_spec=False):
    from fastattn.kernels import attention_sm90 as S
    from fastattn.kernels import attention_sm90_bwd as B

    return ([("fwd", i, dt, warp_spec) for i in range(len(S.compile_cases())) for dt in ("f16", "bf16")]
            + [("bwd", i, dt, False) for i in range(len(B.compile_cases())) for dt in ("f16", "bf16")])


def format_table(rows) -> str:
    lines = ["triton kernel variant   dtype hd  loads  config            regs  smem    spills wgmma tma_ld tma_st "
             "wait  error"]
    for r in rows:
        lines.append(f"{r['triton']:6} {r['kernel']:6} {r['variant']:9} {r['dtype']:5} {r['head_dim']:<3} {r['loads']:6} "
                     f"{r['config']:17} "
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
