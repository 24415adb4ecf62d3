"""Attention benchmarks: fastattn (each backend that serves the case) against torch SDPA, the naive
math reference and torch.compile of that math, on identical inputs; one group per case.

CPU cases are issue 5's table. GPU cases (issues 3 and 6): fp16/bf16, head dims 64 and 128,
sequence 1k..16k with batch × seq = 16k tokens and 16 heads, causal off/on, forward and
forward+backward; half the keys padded vs none at seq 4k; the classifier's shape (hd 25, L 256).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import common
from common import COMPILE_MATH, NAIVE, SDPA, Case

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
TRITON_CLASSIC = "fastattn[triton-classic]"


def attn_case(device, pass_, dtype, N, H, L, E, variant="none", family_x=""):
    return Case(device, "attention", pass_, dtype, (("N", N), ("H", H), ("L", L), ("E", E)), variant, family_x,
                ("N",) if family_x else ())


CPU_CASES = [
    attn_case("cpu", "fwd", FP32, 32, 4, 256, 25),       # the classifier's attention
    attn_case("cpu", "fwd+bwd", FP32, 32, 4, 256, 25),
    attn_case("cpu", "fwd", FP32, 8, 12, 512, 64),       # BERT-base
    attn_case("cpu", "fwd+bwd", FP32, 8, 12, 512, 64),
    attn_case("cpu", "fwd", BF16, 32, 4, 256, 25),
    attn_case("cpu", "fwd", BF16, 8, 12, 512, 64),
]

GPU_TOKENS, GPU_HEADS = 16384, 16
GPU_SEQS = (1024, 2048, 4096, 8192, 16384)


def _gpu_cases():
    cases = []
    for dtype in (FP16, BF16):
        for E in (64, 128):
            for pass_ in ("fwd", "fwd+bwd"):
                for variant in ("none", "causal"):
                    for L in GPU_SEQS:
                        cases.append(attn_case("cuda", pass_, dtype, GPU_TOKENS // L, GPU_HEADS, L, E, variant, "L"))
                # half of every sequence's keys padded; its twin is the unpadded case above
                cases.append(attn_case("cuda", pass_, dtype, GPU_TOKENS // 4096, GPU_HEADS, 4096, E, "kpad50"))
        for pass_ in ("fwd", "fwd+bwd"):
            cases.append(attn_case("cuda", pass_, dtype, 32, 4, 256, 25))   # the classifier's shape
    return cases


GPU_CASES = _gpu_cases()


def _methods(case: Case) -> list[str]:
    out = [SDPA] + [common.fastattn_method(b) for b in common.fastattn_backends(case.device)]
    if case.device == "cuda" and "triton" in common.fastattn_backends(case.device):
        out.append(TRITON_CLASSIC)  # the pre-sm_90 Triton forward, beside the sm_90 one, same inputs
    small = case["L"] <= 512
    if common.fastattn_module() is not None and (case.device == "cpu" or small):
        out.append(NAIVE)
    if case.device == "cpu" and common.fastattn_module() is not None:
        out.append(COMPILE_MATH)
    return out


def _params():
    ps = []
    for case in CPU_CASES:
        for m in _methods(case):
            ps.append(pytest.param(case, m, id=f"{case.id}::{m}"))
    for case in GPU_CASES:
        for m in _methods(case):
            ps.append(pytest.param(case, m, id=f"{case.id}::{m}", marks=pytest.mark.gpu))
    return ps


def _flops(case: Case) -> float:
    return common.attention_flops(case["N"], case["H"], case["L"], case["L"], case["E"],
                                  causal=case.variant == "causal", backward=case.backward)


# -- inputs and the expected result, shared by every method of a case --------------------------------
_LAST = common.LastCase()


def _make_inputs(case: Case):
    torch.manual_seed(0)
    N, H, L, E = case["N"], case["H"], case["L"], case["E"]
    dev, dt = case.device, case.dtype
    q, k, v = (torch.randn(N, H, L, E, device=dev, dtype=dt) for _ in range(3))
    kpm = None
    if case.variant == "kpad50":
        kpm = torch.zeros(N, L, dtype=torch.bool, device=dev)
        kpm[:, L // 2:] = True                      # True = this key is ignored
    g = torch.randn(N, H, L, E, device=dev, dtype=dt) if case.backward else None
    # Expected: torch SDPA on float32 copies (the same values), outputs then grads.
    q32, k32, v32 = (t.float().requires_grad_(case.backward) for t in (q, k, v))
    keep = None if kpm is None else ~kpm[:, None, None, :]
    out32 = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=keep, is_causal=case.variant == "causal")
    want = [out32.detach()]
    if case.backward:
        want += list(torch.autograd.grad(out32, (q32, k32, v32), g.float()))
    del q32, k32, v32, out32
    if case.backward:
        for t in (q, k, v):
            t.requires_grad_(True)
    return {"q": q, "k": k, "v": v, "kpm": kpm, "g": g, "want": want}


def _forward(case: Case, method: str, inp: dict):
    """A no-argument forward call of ``method`` on the case's inputs."""
    q, k, v, kpm = inp["q"], inp["k"], inp["v"], inp["kpm"]
    causal = case.variant == "causal"
    if method == SDPA:
        keep = None if kpm is None else ~kpm[:, None, None, :]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=causal)
    fa = common.fastattn_module()
    if method == NAIVE:
        return lambda: fa.scaled_dot_product_attention(q, k, v, is_causal=causal, key_padding_mask=kpm,
                                                       backend="reference")
    if method == COMPILE_MATH:
        from fastattn.reference import attention_reference
        compiled = common.fresh_compile(attention_reference)
        return lambda: compiled(q, k, v, None, kpm, 0.0, causal)
    if method == TRITON_CLASSIC:
        # fastattn[triton] runs kernels/attention_sm90.py's forward where it serves (sm_90);
        # this method runs kernels/attention.py's kernels for the same call (FASTATTN_TRITON_ATTN=classic).
        import importlib
        sm90 = importlib.import_module("fastattn.kernels.attention_sm90")

        def classic():
            old = sm90.MODE
            sm90.use_mode("classic")
            try:
                return fa.scaled_dot_product_attention(q, k, v, is_causal=causal, key_padding_mask=kpm,
                                                       backend="triton")
            finally:
                sm90.use_mode(old)
        return classic
    backend = method[len("fastattn["):-1]
    return lambda: fa.scaled_dot_product_attention(q, k, v, is_causal=causal, key_padding_mask=kpm,
                                                   backend=backend)


def _sdpa_context(call):
    """Run ``call`` under torch's SDPA backends in order flash, efficient, cuDNN, math; the first that
    runs is the one timed. Returns (context factory, backend name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    errors = []
    for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
              SDPBackend.MATH):
        try:
            with sdpa_kernel([b]):
                call()
            return (lambda: sdpa_kernel([b])), b.name
        except RuntimeError as e:
            errors.append(f"{b.name}: {str(e).splitlines()[0][:120]}")
    raise RuntimeError("no torch SDPA backend ran this case: " + " | ".join(errors))


@pytest.mark.parametrize("case,method", _params())
def test_attention(benchmark, case: Case, method: str):
    inp = _LAST.get(case.id, lambda: _make_inputs(case))
    fwd = _forward(case, method, inp)
    call = common.grads_fn(fwd, [inp["q"], inp["k"], inp["v"]], inp["g"]) if case.backward else fwd
    extra = {}
    if case.variant == "kpad50":
        extra["twin"] = attn_case(case.device, case.pass_, case.dtype, case["N"], case["H"], case["L"],
                                  case["E"], "none", "L").id   # the same call without padding
    make_ctx = contextlib.nullcontext
    if method == SDPA:   # time torch's SDPA under the backend it used, named in extra_info
        make_ctx, extra["sdpa_backend"] = _sdpa_context(call)
    with make_ctx():
        got = common.skip_if_refused(call, method)
    common.check_close(got, inp["want"], case.dtype, f"{method} on {case.id}")
    del got
    common.measure(benchmark, call, case, method, baseline=SDPA, flops=_flops(case), context=make_ctx(),
                   extra=extra)
