"""bf16 vs fp32 on the CPU (issue 11, item 4): fastattn in bfloat16 against fastattn's own float32 on
the same shape, and against torch's bf16 peers, on identical inputs (the fp32 row gets the bf16
inputs widened), one group per case.

On a CPU with avx512_bf16 and no AMX bf16 runs on vdpbf16ps (attention: csrc/cpu/attention_bf16dot.h;
feed-forward: oneDNN bf16 GEMMs, csrc/cpu/ffn_bf16dot.h); the target is bf16 >= 1.33x fastattn fp32.
extra_info["bf16_path"] says which path served the bf16 row (amx, bf16dot or fp32-convert).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import common
from common import FFN_EAGER, SDPA, Case

FP32, BF16 = torch.float32, torch.bfloat16
FA_BF16 = "fastattn[cpu] bf16"
FA_FP32 = "fastattn[cpu] fp32 (same shape)"
ACTIVATION = "relu"
BF16_SWEEP = "bf16 vs fp32"  # extra_info["sweep"] of the bf16 rows (target >= 1.33x fastattn fp32)


def attn_case(pass_, N, H, L, E):
    return Case("cpu", "attention", pass_, BF16, (("N", N), ("H", H), ("L", L), ("E", E)), "vs-fp32")


def ffn_case(pass_, T, D, Fh):
    return Case("cpu", "ffn", pass_, BF16, (("T", T), ("D", D), ("F", Fh)), "vs-fp32")


CASES = [attn_case(p, *s) for s in ((8, 12, 512, 64), (32, 4, 256, 25)) for p in ("fwd", "fwd+bwd")] + \
        [ffn_case(p, *s) for s in ((8192, 100, 2048), (8192, 512, 2048)) for p in ("fwd", "fwd+bwd")]


def _methods(case: Case) -> list[str]:
    peer = SDPA if case.op == "attention" else FFN_EAGER
    if common.fastattn_module() is None or "cpu" not in common.fastattn_backends("cpu"):
        return [peer]
    return [FA_FP32, FA_BF16, peer]


def _params():
    return [pytest.param(c, m, id=f"{c.id}::{m}") for c in CASES for m in _methods(c)]


def _bf16_path(op: str) -> str:
    ops = torch.ops
    if op == "attention":
        if hasattr(ops, "fastattn_amx") and ops.fastattn_amx.available():
            return "amx"
    elif hasattr(ops, "fastattn_ffn") and ops.fastattn_ffn.amx_available():
        return "amx"
    try:
        if ops.fastattn_bf16dot.available():
            return "bf16dot"
    except (AttributeError, RuntimeError):
        pass
    return "fp32-convert"


def _inputs(case: Case):
    torch.manual_seed(0)
    if case.op == "attention":
        N, H, L, E = case["N"], case["H"], case["L"], case["E"]
        args = [torch.randn(N, H, L, E).to(BF16) for _ in range(3)]
        g = torch.randn(N, H, L, E).to(BF16) if case.backward else None
    else:
        T, D, Fh = case["T"], case["D"], case["F"]
        args = [torch.randn(T, D), torch.randn(Fh, D) / D ** 0.5, torch.randn(Fh) * 0.1,
                torch.randn(D, Fh) / Fh ** 0.5, torch.randn(D) * 0.1]
        args = [a.to(BF16) for a in args]
        g = torch.randn(T, D).to(BF16) if case.backward else None
    return args, g


_LAST = common.LastCase()


def _forward(case: Case, method: str, args):
    fa = common.fastattn_module()
    if case.op == "attention":
        q, k, v = args
        if method == SDPA:
            return lambda: F.scaled_dot_product_attention(q, k, v)
        return lambda: fa.scaled_dot_product_attention(q, k, v, backend="cpu")
    x, w1, b1, w2, b2 = args
    if method == FFN_EAGER:
        return lambda: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    return lambda: fa.feed_forward(x, w1, b1, w2, b2, ACTIVATION, 0.0, backend="cpu")


@pytest.mark.parametrize("case,method", _params())
def test_bf16_vs_fp32(benchmark, case: Case, method: str):
    inp = _LAST.get(case.id, lambda: _inputs(case))
    args, g = inp
    if method == FA_FP32:
        args = [a.float() for a in args]
        g = None if g is None else g.float()
    args = [a.detach().requires_grad_(case.backward) for a in args]
    fwd = _forward(case, method, args)
    call = common.grads_fn(fwd, args, g) if case.backward else fwd
    got = common.skip_if_refused(call, method)
    if method != FA_FP32:  # both bf16 rows against the fp32 row's math on the same inputs
        wl = [a.detach().float().requires_grad_(case.backward) for a in args]
        want_fwd = _forward(case, SDPA if case.op == "attention" else FFN_EAGER, wl)
        want = common.grads_fn(want_fwd, wl, g.float())() if case.backward else want_fwd()
        common.check_close(got, want, BF16, f"{method} on {case.id}")
    del got
    if case.op == "attention":
        flops = common.attention_flops(case["N"], case["H"], case["L"], case["L"], case["E"], backward=case.backward)
    else:
        flops = common.ffn_flops(case["T"], case["D"], case["F"], backward=case.backward)
    extra = {"bf16_path": _bf16_path(case.op), "compute_dtype": "fp32" if method == FA_FP32 else "bf16"}
    if method == FA_BF16 and extra["bf16_path"] != "fp32-convert":  # the family: where bf16 dot products exist
        extra.update({"sweep": BF16_SWEEP, "target_ratio": 1.33})
    common.measure(benchmark, call, case, method, baseline=FA_FP32, flops=flops, extra=extra)
