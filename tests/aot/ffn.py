"""The feed-forward sweep: every tile kernels/configs.py can choose, compiled for sm_80 and sm_90.

Jobs: each (kernel, dtype, alignment, tile, arch) of configs.FFN, the linear kernel once per operand
layout of feed_forward.LINEAR_ROLES, fp32 as ieee and as tf32, plus the column-sum kernel.
"aligned" compiles with every shape-like integer divisible by 16 (what the JIT sees for 768/3072
sizes), "unaligned" with only the pointers aligned.
"""
from __future__ import annotations

import sys

from . import common
from .compat import make_ast_source

# integer arguments that are not shape-like (never 16-divisible in the "aligned" variant)
_NOT_ALIGNED = {"seed", "p", "drop_scale", "has_bias", "store_pre", "store_h", "act", "R", "rows_per_prog"}
_FN = {"up": "_ffn_up_kernel", "dh": "_ffn_dh_kernel", "linear": "_ffn_linear_kernel",
       "prologue": "_ffn_linear_kernel", "colsum": "_ffn_colsum_kernel"}


def _arg_types(kernel: str, dt: str, dst: str | None = None) -> dict:
    """triton signature types of every non-constexpr argument, for data type dt."""
    p, i = f"*{dt}", "i32"
    if kernel == "up":
        return dict(x_ptr=p, w1_ptr=p, b1_ptr=p, h_ptr=p, pre_ptr=p, T=i, F=i, D=i, seed="*i64", p="fp32",
                    drop_scale="fp32", has_bias=i, store_pre=i, act=i)
    if kernel in ("linear", "prologue"):
        return dict(a_ptr=p, b_ptr=p, bias_ptr=p, c_ptr=p, M=i, N=i, K=i, lda=i, ldb=i, has_bias=i, act=i)
    if kernel == "dh":
        return dict(go_ptr=p, w2_ptr=p, pre_ptr=p, dpre_ptr=p, h_ptr=p, db1p_ptr="*fp32", T=i, F=i, D2=i,
                    seed="*i64", p="fp32", drop_scale="fp32", store_h=i, act=i)
    return dict(x_ptr=p, out_ptr=f"*{dst}", R=i, C=i, rows_per_prog=i)


def all_jobs(all_dtypes: bool = True) -> list[dict]:
    # every dtype always: the 16-bit epilogues differ between fp16 and bf16 by up to 25 registers, and
    # the bf16 GEMM-only jobs cost ~10% of this sweep's ~100 CPU seconds (2026-11-30)
    from fastattn.kernels import configs as C
    from fastattn.kernels import feed_forward as ff

    roles = {}  # linear-kernel operand layouts -> the roles that launch them
    for role, flags in ff.LINEAR_ROLES.items():
        roles.setdefault(("prologue" if flags["B_FROM_PRE"] else "linear", tuple(sorted(flags.items()))), []).append(role)
    jobs, seen = [], set()
    for (kernel, dc, align, _size, arch), tile in sorted(C.FFN.items(), key=lambda kv: str(kv[0])):
        if (kernel, dc, align, str(tile), arch) in seen:
            continue
        seen.add((kernel, dc, align, str(tile), arch))
        layouts = [(None, None)] if kernel in ("up", "dh") else \
            [(dict(flags), "/".join(r)) for (k, flags), r in roles.items() if k == kernel]
        for dtype in (("fp16", "bf16") if dc == "f16" else ("fp32",)):
            for flags, spec in layouts:
                jobs.append(dict(kernel=kernel, dtype=dtype if dc != "tf32" else "tf32", align=align, spec=spec,
                                 flags=flags, tile=str(tile), arch=arch))
    pairs = sorted({(src, dst) for dt in ("fp16", "bf16", "fp32") for src, dst in
                    ((dt, dt), (dt, "fp32"), ("fp32", dt))})
    for src, dst in pairs:
        for arch in C.ARCH_FAMILIES:
            jobs.append(dict(kernel="colsum", dtype=src, spec=f"{src}->{dst}", arch=arch,
                             tile=f"{ff.COLSUM_BLOCK_R}x{ff.COLSUM_BLOCK_C} w{ff.COLSUM_NUM_WARPS} s1"))
    return jobs


def compile_job(job: dict) -> dict:
    from fastattn.kernels import configs as C
    from fastattn.kernels import feed_forward as ff

    kernel = job["kernel"]
    fn = getattr(ff, _FN[kernel])
    dtype = "fp32" if job["dtype"] == "tf32" else job["dtype"]
    if kernel == "colsum":
        src, dst = job["spec"].split("->")
        types = _arg_types(kernel, src, dst)
        consts = dict(BLOCK_R=ff.COLSUM_BLOCK_R, BLOCK_C=ff.COLSUM_BLOCK_C)
        src_ = make_ast_source(fn, types, consts, [n for n in types if types[n].startswith("*")])
        return common.compile_source(src_, job["arch"], ff.COLSUM_NUM_WARPS, None)
    tile = C.parse(job["tile"])
    types = _arg_types(kernel, dtype)
    consts = dict(tile.kwargs, INPUT_PRECISION="tf32" if job["dtype"] != "fp32" else "ieee")
    if kernel == "dh":
        consts["DB1_ROWS"] = ff.DB1_ROWS
    if job.get("flags"):
        consts.update(job["flags"])
    aligned = job["align"] == "aligned"
    # the seed pointer is do_not_specialize: the JIT never marks it 16-divisible
    divisible = [n for n in types if n != "seed" and (types[n].startswith("*") or (aligned and n not in _NOT_ALIGNED))]
    return common.compile_source(make_ast_source(fn, types, consts, divisible), job["arch"], tile.num_warps,
                                 tile.num_stages)


if __name__ == "__main__":
    sys.exit(common.main(__doc__.splitlines()[0], all_jobs, compile_job))
