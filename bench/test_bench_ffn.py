"""Feed-forward benchmarks: fastattn.feed_forward (each backend that serves the case) against the
eager block F.linear → ReLU → F.linear (dropout 0) and torch.compile of it; on a GPU also the two
GEMMs alone through cuBLAS (torch.mm), the throughput ceiling of issue 4's "within 85%" check.

CPU (issue 5): 8192 tokens, 100 → 2048 → 100, fp32, forward and forward+backward.
GPU (issues 4, 6): fp16/bf16, tokens 8k/16k/64k, 768 → 3072 → 768 and 4096 → 16384 → 4096.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import common
from common import CUBLAS, FFN_COMPILE, FFN_EAGER, Case

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
ACTIVATION = "relu"


def ffn_case(device, pass_, dtype, T, D, Fh, family_x=""):
    return Case(device, "ffn", pass_, dtype, (("T", T), ("D", D), ("F", Fh)), "none", family_x)


CPU_CASES = [ffn_case("cpu", "fwd", FP32, 8192, 100, 2048), ffn_case("cpu", "fwd+bwd", FP32, 8192, 100, 2048)]

GPU_CASES = [ffn_case("cuda", pass_, dtype, T, D, Fh, "T")
             for dtype in (BF16, FP16)
             for D, Fh in ((768, 3072), (4096, 16384))
             for pass_ in ("fwd", "fwd+bwd")
             for T in (8192, 16384, 65536)]


def _methods(case: Case) -> list[str]:
    out = [FFN_EAGER, FFN_COMPILE] + [common.fastattn_method(b) for b in common.fastattn_backends(case.device)]
    if case.device == "cuda" and case.pass_ == "fwd":
        out.append(CUBLAS)
    return out


def _params():
    ps = []
    for case in CPU_CASES:
        ps += [pytest.param(case, m, id=f"{case.id}::{m}") for m in _methods(case)]
    for case in GPU_CASES:
        ps += [pytest.param(case, m, id=f"{case.id}::{m}", marks=pytest.mark.gpu) for m in _methods(case)]
    return ps


def _flops(case: Case) -> float:
    return common.ffn_flops(case["T"], case["D"], case["F"], backward=case.backward)


def _bytes(case: Case) -> float:
    """Rough peak of the eager block: inputs, weights, two (T, F) hiddens, more for the backward."""
    T, D, Fh = case["T"], case["D"], case["F"]
    size = torch.finfo(case.dtype).bits // 8
    hidden = T * Fh * size * (4 if case.backward else 2)
    return hidden + (4 * T * D + 4 * D * Fh) * size


_LAST = common.LastCase()


def eager_block(x, w1, b1, w2, b2):
    return F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)


def _make_inputs(case: Case):
    torch.manual_seed(0)
    T, D, Fh = case["T"], case["D"], case["F"]
    dev, dt = case.device, case.dtype
    x = torch.randn(T, D, device=dev, dtype=dt)
    w1 = (torch.randn(Fh, D, device=dev) / D ** 0.5).to(dt)
    b1 = (torch.randn(Fh, device=dev) * 0.1).to(dt)
    w2 = (torch.randn(D, Fh, device=dev) / Fh ** 0.5).to(dt)
    b2 = (torch.randn(D, device=dev) * 0.1).to(dt)
    g = torch.randn(T, D, device=dev, dtype=dt) if case.backward else None
    leaves32 = [t.float().requires_grad_(case.backward) for t in (x, w1, b1, w2, b2)]
    out32 = eager_block(*leaves32)
    want = [out32.detach()]
    if case.backward:
        want += list(torch.autograd.grad(out32, leaves32, g.float()))
        for t in (x, w1, b1, w2, b2):
            t.requires_grad_(True)
    del leaves32, out32
    return {"args": (x, w1, b1, w2, b2), "g": g, "want": want}


_GPU_COMPILED: dict = {}


def _compiled(case: Case):
    """torch.compile of the eager block. CPU: static shapes, compiled per case. GPU: one compile per
    (dtype, pass) with dynamic shapes, reused over the 12 token counts and widths (the GEMMs are
    cuBLAS calls either way; static shapes would cost about 24 inductor compiles of the GPU budget)."""
    if case.device == "cpu":
        return common.fresh_compile(eager_block), False
    key = (case.dtype, case.pass_)
    if key not in _GPU_COMPILED:
        _GPU_COMPILED[key] = torch.compile(eager_block, dynamic=True)
    return _GPU_COMPILED[key], True


def _forward(case: Case, method: str, args):
    x, w1, b1, w2, b2 = args
    if method == FFN_EAGER:
        return lambda: eager_block(x, w1, b1, w2, b2)
    if method == FFN_COMPILE:
        compiled, _ = _compiled(case)
        return lambda: compiled(x, w1, b1, w2, b2)
    if method == CUBLAS:
        return lambda: torch.mm(torch.mm(x, w1.t()), w2.t())
    fa = common.fastattn_module()
    backend = method[len("fastattn["):-1]
    return lambda: fa.feed_forward(x, w1, b1, w2, b2, ACTIVATION, 0.0, backend=backend)


@pytest.mark.parametrize("case,method", _params())
def test_ffn(benchmark, case: Case, method: str):
    if case.device == "cuda" and not common.gpu_memory_fits(_bytes(case)):
        pytest.skip(f"{case.id} needs about {_bytes(case) / 2**30:.1f} GiB; not free on this GPU")
    inp = _LAST.get(case.id, lambda: _make_inputs(case))
    fwd = _forward(case, method, inp["args"])
    call = common.grads_fn(fwd, list(inp["args"]), inp["g"]) if case.backward else fwd
    got = common.skip_if_refused(call, method)
    if method != CUBLAS:   # the GEMMs alone: no bias, no activation; a ceiling, not a result
        common.check_close(got, inp["want"], case.dtype, f"{method} on {case.id}")
    del got
    common.measure(benchmark, call, case, method, baseline=FFN_EAGER, flops=_flops(case),
                   extra={"activation": ACTIVATION, "dropout_p": 0.0,
                          **({"flops_note": "the two GEMMs only"} if method == CUBLAS else {}),
                          **({"compile_dynamic": case.device == "cuda"} if method == FFN_COMPILE else {})})
