"""The attention sweep: every tile kernels/configs.py can choose, compiled for sm_80 and sm_90.

The jobs are fastattn.kernels.attention.compile_cases(arch) for arch 80 and 90, once per dtype
class: f16 compiled as fp16, f32 and tf32 as fp32 with input_precision ieee / tf32.

bfloat16 shares the f16 tiles and is not compiled by default (--all-dtypes, or
FASTATTN_AOT_ALL_DTYPES=1, adds it). Why fp16 proves it: the kernels do every elementwise operation
in fp32 (scores, softmax, dropout, dS, the accumulators); the element type appears only in the
loads, in the casts of P and dS to the input dtype before tl.dot, and in the mma's operand type, and
on sm_80/sm_90 bf16 has the same instruction shapes as fp16 for all three (ldmatrix/ld.global of
16-bit elements, one cvt.rn.{f16,bf16}x2.f32 per pair, mma.m16n8k16 / wgmma with the same fragment
registers). Measured (2026-11-30, triton 3.6 and 3.9, sm_80 and sm_90, --all-dtypes): every fp16 row
and its bf16 twin had the same verdict, stack and shared memory; the forward, dQ and dK/dV rows the
same registers, the delta pre-pass within 6. Run --all-dtypes again when the kernels change.
"""
from __future__ import annotations

import sys

from . import common
from .compat import make_ast_source, runtime_type

_PTR = {"f16": "*fp16", "bf16": "*bf16", "f32": "*fp32", "tf32": "*fp32"}
_FLOAT_ARGS = {"dropout_p", "qk_scale", "sm_scale"}
_DATA_PTRS = {"Q", "K", "V", "Out", "DOut", "DQ", "DK", "DV"}
_DIVISIBLE_INTS = {"HEAD_D", "HEAD_DV", "stride_ml", "S", "L"}


def signature(kernel, dtype: str, constexprs: dict) -> tuple[dict, list]:
    """(types {runtime argument: triton type}, names carrying the JIT's 16-divisibility).

    Integers are i32; the Philox seed is a pointer to (seed, counter offset); `causal` and
    `has_kpm` are bools, typed as the JIT types one on this triton. Pointers and the head-dim /
    sequence-length integers carry 16-divisibility (aligned tensors, head dims that are multiples
    of 16); every pointer argument is a real, aligned tensor at launch (absent ones get a dummy)."""
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name in ("Lse", "LseSplit", "Delta", "Mask"):  # the additive mask arrives as float32
            types[name] = "*fp32"
        elif name == "Kpm":
            types[name] = "*u8"
        elif name == "KvRange":
            types[name] = "*i32"
        elif name in _DATA_PTRS:
            types[name] = _PTR[dtype]
        elif name in _FLOAT_ARGS:
            types[name] = "fp32"
        elif name == "seed":
            types[name] = "*i64"  # (Philox seed, counter offset), read on the device
        elif name in ("causal", "has_kpm"):
            types[name] = runtime_type(True)
        else:
            types[name] = "i32"
    # the seed pointer is do_not_specialize: the JIT never marks it 16-divisible
    divisible = [n for n, t in types.items() if (t.startswith("*") and n != "seed") or n in _DIVISIBLE_INTS]
    return types, divisible


def all_jobs(all_dtypes: bool = False) -> list[dict]:
    from fastattn.kernels import attention as A

    jobs = []
    dtypes = {"f16": ("f16", "bf16") if all_dtypes else ("f16",), "f32": ("f32",), "tf32": ("tf32",)}
    for arch in A.configs.ARCH_FAMILIES:
        for name, dc, hd, var, tile in A.compile_cases(arch):
            for dtype in dtypes[dc]:
                jobs.append(dict(kernel=name, dtype=dtype, hd=hd, variant=var, tile=str(tile), arch=arch))
    # the heaviest first (fp32, large head dims, mask and dropout): they take longest and are the
    # ones that spill, so a sweep's pool ends evenly and a failure shows early
    weight = {"tf32": 0, "f32": 1, "bf16": 2, "f16": 3}
    return sorted(jobs, key=lambda j: (-j["hd"], weight[j["dtype"]], -len(j["variant"] or "")))


def compile_job(job: dict) -> dict:
    from fastattn.kernels import attention as A
    from fastattn.kernels import configs as C

    name, tile, hd = job["kernel"], C.parse(job["tile"]), job["hd"]
    kernel = A.KERNELS[name]
    dc = "f16" if job["dtype"] == "bf16" else job["dtype"]
    var = job["variant"].split("+")
    consts = dict(tile.kwargs, BLOCK_D=hd, BLOCK_DV=hd, HAS_MASK="mask" in var, HAS_DROPOUT="drop" in var,
                  INPUT_PRECISION=tile.precision or C.input_precision(dc))
    if name == "bwd_delta":  # BLOCK_M only; the rows it splits take SPLIT_N keys a step
        del consts["BLOCK_N"]
        consts["SPLIT_N"] = A.SPLIT_N
    dtype = "f32" if job["dtype"] == "tf32" else job["dtype"]
    types, divisible = signature(kernel, dtype, consts)
    row = common.compile_source(make_ast_source(kernel, types, consts, divisible), job["arch"], tile.num_warps,
                                tile.num_stages)
    return row


if __name__ == "__main__":
    sys.exit(common.main(__doc__.splitlines()[0], all_jobs, compile_job))
