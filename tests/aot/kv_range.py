"""The key-range kernel (kernels/attention.py's _kv_range_kernel: [first, last + 1] unpadded key of each
batch element, launched once per classic/sm_90 launcher call with a key_padding_mask), compiled for
sm_80 and sm_90 with the triton this interpreter imports (PYTHONPATH picks 3.6).

One tile (KV_RANGE_BLOCK keys a step, KV_RANGE_WARPS warps, KV_RANGE_STAGES stages: what the launcher
launches), twice per arch: the mask pointer 16-byte aligned (what the JIT marks divisible) and not (a
row slice of a mask whose S is not a multiple of 16); S is do_not_specialize (plain i32) and the output
is a fresh, aligned allocation. Rows as the other sweeps'. Used by tests/test_triton_kv_range.py; by hand:
    python -m aot.kv_range --jobs 1   (from tests/)
"""
from __future__ import annotations

import sys

from . import common
from .compat import make_ast_source


def all_jobs(all_dtypes: bool = False) -> list[dict]:
    from fastattn.kernels import attention as A

    tile = f"b{A.KV_RANGE_BLOCK} w{A.KV_RANGE_WARPS} s{A.KV_RANGE_STAGES}"
    return [dict(kernel="kv_range", dtype="u8", align=align, tile=tile, arch=arch)
            for arch in A.configs.ARCH_FAMILIES for align in ("aligned", "unaligned")]


def compile_job(job: dict) -> dict:
    from fastattn.kernels import attention as A

    types = {"Kpm": "*u8", "KvRange": "*i32", "S": "i32"}
    divisible = ["Kpm", "KvRange"] if job["align"] == "aligned" else ["KvRange"]
    src = make_ast_source(A._kv_range_kernel, types, {"BLOCK": A.KV_RANGE_BLOCK}, divisible)
    return common.compile_source(src, job["arch"], A.KV_RANGE_WARPS, A.KV_RANGE_STAGES)


if __name__ == "__main__":
    sys.exit(common.main(__doc__.splitlines()[0], all_jobs, compile_job))
