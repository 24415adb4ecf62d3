"""The attention sweep: every tile kernels/configs.py can choose, compiled for sm_80 and sm_90.

The jobs are fastattn.kernels.attention.compile_cases(arch) for arch 80 and 90, once per element
dtype of the dtype class (f16: fp16 and bf16; f32 and tf32: fp32 with input_precision ieee / tf32).
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


def all_jobs() -> list[dict]:
    from fastattn.kernels import attention as A

    jobs = []
    for arch in A.configs.ARCH_FAMILIES:
        for name, dc, hd, var, tile in A.compile_cases(arch):
            for dtype in {"f16": ("f16", "bf16"), "f32": ("f32",), "tf32": ("tf32",)}[dc]:
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
                  INPUT_PRECISION=C.input_precision(dc))
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
