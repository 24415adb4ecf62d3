"""The small-attention sweep (kernels/attention_small.py, issue 14): every tile of its TILES table,
compiled for sm_80 and sm_90 with the triton this interpreter imports (PYTHONPATH picks 3.6).

Rows as tests/aot/attention.py's (kernel, dtype, hd, tile, arch, regs, stack, spill, smem). The f16
class compiles as fp16 only, as the classic sweep does (tests/aot/attention.py says why bf16 shares
the verdict; --all-dtypes adds the bf16 twins). Used by tests/test_triton_small_attention.py; by hand:
    python -m aot.small --jobs 1 [--filter "small_bwd f16"]   (from tests/)
"""
from __future__ import annotations

import sys

from . import common
from .attention import signature as _classic_signature
from .compat import make_ast_source, runtime_type


def signature(kernel, dtype: str, constexprs: dict):
    """The classic sweep's types, plus this kernel's own runtime arguments: the softmax `scale`
    (fp32) and the runtime bools has_mask / has_dropout."""
    types, divisible = _classic_signature(kernel, dtype, constexprs)
    types["scale"] = "fp32"
    for name in ("has_mask", "has_dropout"):
        types[name] = runtime_type(True)
    return types, [n for n in divisible if n in types]


def all_jobs(all_dtypes: bool = False) -> list[dict]:
    from fastattn.kernels import attention_small as S

    jobs = []
    for name, dc, hd, bs, arch, tile, res in S.compile_cases():
        for dtype in (("f16", "bf16") if all_dtypes else ("f16",)) if dc == "f16" else (dc,):
            jobs.append(dict(kernel=name, dtype=dtype, hd=hd, variant=f"s{bs}" + ("" if res else " reload"),
                             tile=str(tile), arch=arch))
    # the heaviest first: the backward, fp32, wide tiles
    weight = {"tf32": 0, "f32": 1, "bf16": 2, "f16": 3}
    return sorted(jobs, key=lambda j: (j["kernel"] != "small_bwd", weight[j["dtype"]], -j["hd"], j["variant"]))


def compile_job(job: dict) -> dict:
    from fastattn.kernels import attention_small as S
    from fastattn.kernels import configs as C

    tile = C.parse(job["tile"])
    kernel = S.KERNELS[job["kernel"]]
    dc = "f16" if job["dtype"] == "bf16" else job["dtype"]
    consts = dict(BLOCK_M=tile.block_m, BLOCK_S=tile.block_n, BLOCK_D=job["hd"], BLOCK_DV=job["hd"],
                  INPUT_PRECISION=C.input_precision(dc), KV_RESIDENT="reload" not in job["variant"])
    types, divisible = signature(kernel, "f32" if job["dtype"] == "tf32" else job["dtype"], consts)
    return common.compile_source(make_ast_source(kernel, types, consts, divisible), job["arch"], tile.num_warps,
                                 tile.num_stages)


if __name__ == "__main__":
    sys.exit(common.main(__doc__.splitlines()[0], all_jobs, compile_job))
