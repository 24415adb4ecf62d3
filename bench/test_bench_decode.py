"""Decoding benchmarks (issue 11): a few query rows against a long KV cache, fastattn against torch
SDPA on identical inputs; one group per case.

Decoding reads each K/V element once per call and does little arithmetic with it, so the figure
that matters is the memory traffic: extra_info["gbps"] is the bytes of K and V read per second
(``kv_bytes`` / median time), to hold against the machine's memory read bandwidth. GQA cases give
torch SDPA ``enable_gqa=True`` (it reads the shared K/V heads without copying them).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import common
from common import SDPA, Case

FP32, BF16 = torch.float32, torch.bfloat16
DECODE = "decode"  # extra_info["sweep"]: the report's per-family line (lowest ratio, GB/s); target >= 1.5x


def decode_case(dtype, N, H, Hkv, L, S, E):
    return Case("cpu", "decode", "fwd", dtype, (("N", N), ("H", H), ("Hkv", Hkv), ("L", L), ("S", S), ("E", E)))


CASES = [
    decode_case(FP32, 1, 32, 8, 1, 4096, 128),   # one sequence, GQA 4, a 4k cache
    decode_case(FP32, 8, 32, 8, 1, 2048, 128),   # a batch of 8, GQA 4
    decode_case(FP32, 4, 16, 16, 1, 1024, 64),   # no GQA
    decode_case(BF16, 1, 32, 8, 1, 4096, 128),
    decode_case(BF16, 8, 32, 8, 1, 2048, 128),
    decode_case(BF16, 4, 16, 16, 1, 1024, 64),
]


def _methods() -> list[str]:
    return [SDPA] + [common.fastattn_method(b) for b in common.fastattn_backends("cpu")]


def _params():
    return [pytest.param(c, m, id=f"{c.id}::{m}") for c in CASES for m in _methods()]


def kv_bytes(case: Case) -> int:
    elt = torch.empty((), dtype=case.dtype).element_size()
    return 2 * case["N"] * case["Hkv"] * case["S"] * case["E"] * elt


_LAST = common.LastCase()


def _make_inputs(case: Case):
    torch.manual_seed(0)
    N, H, Hkv, L, S, E = (case[x] for x in ("N", "H", "Hkv", "L", "S", "E"))
    q = torch.randn(N, H, L, E, dtype=case.dtype)
    k = torch.randn(N, Hkv, S, E, dtype=case.dtype)
    v = torch.randn(N, Hkv, S, E, dtype=case.dtype)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=H != Hkv)
    return {"q": q, "k": k, "v": v, "want": [want]}


def _forward(case: Case, method: str, inp: dict):
    q, k, v = inp["q"], inp["k"], inp["v"]
    gqa = case["H"] != case["Hkv"]
    if method == SDPA:
        return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    fa = common.fastattn_module()
    backend = method[len("fastattn["):-1]
    return lambda: fa.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, backend=backend)


@pytest.mark.parametrize("case,method", _params())
def test_decode(benchmark, case: Case, method: str):
    inp = _LAST.get(case.id, lambda: _make_inputs(case))
    call = _forward(case, method, inp)
    got = common.skip_if_refused(call, method)
    common.check_close(got, inp["want"], case.dtype, f"{method} on {case.id}")
    del got
    flops = common.attention_flops(case["N"], case["H"], case["L"], case["S"], case["E"])
    nbytes = kv_bytes(case)
    extra = {"kv_bytes": nbytes, "bytes": nbytes}  # bytes: the report's GB/s for the decode family
    if method != SDPA:
        extra.update({"sweep": DECODE, "target_ratio": 1.5})
    common.measure(benchmark, call, case, method, baseline=SDPA, flops=flops, extra=extra)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        benchmark.extra_info["gbps"] = nbytes / stats.stats.median / 1e9
