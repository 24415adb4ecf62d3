"""Issue 11's small-shape families on the CPU, fp32, and the machine's limits measured in the same run.

- tiny calls (sweep "tiny calls"): fastattn.scaled_dot_product_attention against torch's
  F.scaled_dot_product_attention on N1 H1 L1 S64 E64 without grad and N1 H1 L16 S16 E64 forward +
  backward. Target: fastattn's time <= 1.5x torch's (ratio >= 0.667).
- the modules at small shapes (sweep "modules at small shapes"): fastattn.convert() of
  nn.MultiheadAttention (need_weights=False) and of nn.TransformerEncoderLayer (dim_feedforward 4·D,
  dropout 0.1 in train) against the torch modules, batch_first (the layout torch's fused eval path
  needs), eval under no_grad and a train step (forward + backward to the input and every parameter),
  over batch 1-64, tokens 1-2048, d_model 64-1024. Target: >= 1.0x torch at every shape.
- machine limits (sweep "machine limits"): memory read bandwidth (sum of a 256 MB fp32 tensor),
  fp32 GEMM peak (torch.mm 2048³, and numpy.matmul, whose BLAS the row names), bf16 GEMM peak
  (torch.mm bf16 2048³). The report prints them beside the sweeps, so a ratio can be read against
  what the machine can do at all.

Every fastattn row is first checked against its torch peer (dropout 0 for the modules).
``extra_info["sweep"]`` names the family for bench/report.py's per-family summary.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common
from common import SDPA, Case

FP32, BF16 = torch.float32, torch.bfloat16
TINY, MODULES, LIMITS = "tiny calls", "modules at small shapes", "machine limits"
MHA_TORCH = "nn.MultiheadAttention"

# -- tiny calls ------------------------------------------------------------------------------------
TINY_CASES = [
    Case("cpu", "tiny_attention", "fwd", FP32, (("N", 1), ("H", 1), ("L", 1), ("S", 64), ("E", 64))),
    Case("cpu", "tiny_attention", "fwd+bwd", FP32, (("N", 1), ("H", 1), ("L", 16), ("S", 16), ("E", 64))),
]


def _tiny_params():
    ps = []
    for case in TINY_CASES:
        methods = [SDPA] + [common.fastattn_method(b) for b in common.fastattn_backends("cpu")]
        ps += [pytest.param(case, m, id=f"{case.id}::{m}") for m in methods]
    return ps


def _tiny_call(case: Case, method: str, inp: dict):
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["g"]
    if method == SDPA:
        def fwd(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)
    else:
        fa, backend = common.fastattn_module(), method[len("fastattn["):-1]

        def fwd(q, k, v):
            return fa.scaled_dot_product_attention(q, k, v, backend=backend)
    if case.backward:
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        return common.grads_fn(lambda: fwd(qg, kg, vg), [qg, kg, vg], g)

    def run():
        with torch.no_grad():
            return fwd(q, k, v)
    return run


def _tiny_inputs(case: Case) -> dict:
    torch.manual_seed(0)
    n, h, l, s, e = (case[x] for x in "NHLSE")
    return {"q": torch.randn(n, h, l, e), "k": torch.randn(n, h, s, e), "v": torch.randn(n, h, s, e),
            "g": torch.randn(n, h, l, e)}


# -- the modules ---------------------------------------------------------------------------------------
# (batch, tokens, d_model, heads): the E64 H4 16-token case, single tokens, wide batches,
# long single sequences, and d_model up to 1024.
MODULE_SHAPES = [(1, 1, 64, 4), (1, 16, 64, 4), (64, 16, 64, 4), (1, 2048, 64, 4), (1, 256, 256, 8),
                 (8, 128, 512, 8), (2, 64, 1024, 16)]


def _module_cases():
    cases = []
    for op in ("mha", "encoder_layer_small"):
        for n, l, d, h in MODULE_SHAPES:
            for pass_ in ("eval", "train"):
                cases.append(Case("cpu", op, pass_, FP32, (("N", n), ("L", l), ("D", d), ("H", h))))
    return cases


MODULE_CASES = _module_cases()


def _module_peer(case: Case) -> str:
    return MHA_TORCH if case.op == "mha" else common.TEL_TRAIN


def _module_params():
    ps = []
    for case in MODULE_CASES:
        methods = [_module_peer(case)] + [common.fastattn_method(b) for b in common.fastattn_backends("cpu")]
        ps += [pytest.param(case, m, id=f"{case.id}::{m}") for m in methods]
    return ps


def _make_module(case: Case, dropout: float) -> nn.Module:
    d, h = case["D"], case["H"]
    if case.op == "mha":
        return nn.MultiheadAttention(d, h, dropout=dropout, batch_first=True)
    return nn.TransformerEncoderLayer(d, h, 4 * d, dropout=dropout, batch_first=True)


def _module_flops(case: Case) -> float:
    n, l, d, h = (case[x] for x in "NLDH")
    if case.op == "mha":
        t = n * l
        return (common.linear_flops(t, d, 3 * d, backward=case.backward)
                + common.attention_flops(n, h, l, l, d // h, backward=case.backward)
                + common.linear_flops(t, d, d, backward=case.backward))
    return common.encoder_layer_flops(n, l, d, h, 4 * d, backward=case.backward)


def _module_inputs(case: Case) -> dict:
    torch.manual_seed(0)
    n, l, d = case["N"], case["L"], case["D"]
    return {"stock": _make_module(case, 0.1), "x": torch.randn(n, l, d), "g": torch.randn(n, l, d)}


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    return module(x)


def _module_check(case: Case, method: str, inp: dict) -> None:
    ref = _make_module(case, 0.0)
    ref.load_state_dict(inp["stock"].state_dict())
    ours = common.fastattn_module().convert(copy.deepcopy(ref), backend=method[len("fastattn["):-1])
    x = inp["x"].clone().requires_grad_(case.backward)
    results = []
    for m in (ref, ours):
        m.train(case.pass_ == "train")
        if case.backward:
            out = _apply(m, x)
            results.append([out, *torch.autograd.grad(out, [x, *m.parameters()], inp["g"])])
        else:
            with torch.no_grad():
                results.append([_apply(m, x)])
    common.check_close(results[1], results[0], case.dtype, f"{method} on {case.id} (dropout 0)")


def _module_call(case: Case, method: str, inp: dict):
    stock, x = inp["stock"], inp["x"]
    module = stock if method == _module_peer(case) else \
        common.fastattn_module().convert(copy.deepcopy(stock), backend=method[len("fastattn["):-1])
    if case.pass_ == "eval":
        module.eval()

        def run():
            with torch.no_grad():
                return _apply(module, x)
        return run, module
    module.train()
    xg = x.clone().requires_grad_(True)
    return common.grads_fn(lambda: _apply(module, xg), [xg, *module.parameters()], inp["g"]), module


def _torch_fused(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a stock module's eval call ran torch's fused native kernel (seen in the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        _apply(module, x)
    names = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention")
    return any(any(n in e.name for n in names) for e in prof.events())


# -- the machine's limits -----------------------------------------------------------------------------
MEM_MB, GEMM_N = 256, 2048


def _numpy_blas() -> str | None:
    try:
        import numpy
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return str(blas.get("name", "?"))
    except Exception:  # noqa: BLE001 - numpy absent or its config unreadable: the row is skipped
        return None


def _limit_params():
    ps = [pytest.param("memory read bandwidth", "torch.sum (fp32, 256 MB)", id="mem-read"),
          pytest.param("fp32 GEMM peak", "torch.mm fp32", id="gemm-fp32-torch"),
          pytest.param("fp32 GEMM peak", "numpy.matmul fp32", id="gemm-fp32-numpy"),
          pytest.param("bf16 GEMM peak", "torch.mm bf16", id="gemm-bf16-torch")]
    return ps


def _limit_case(limit: str) -> Case:
    if limit == "memory read bandwidth":
        return Case("cpu", "machine", "limit", FP32, (("MB", MEM_MB),), "mem_read")
    dtype = BF16 if limit.startswith("bf16") else FP32
    return Case("cpu", "machine", "limit", dtype, (("M", GEMM_N), ("K", GEMM_N), ("N", GEMM_N)), "gemm")


# -- the tests -----------------------------------------------------------------------------------------
_LAST = common.LastCase()


@pytest.mark.parametrize("case,method", _tiny_params())
def test_tiny(benchmark, case: Case, method: str):
    inp = _LAST.get(case.id, lambda: _tiny_inputs(case))
    if method != SDPA:
        def check():
            common.check_close(_tiny_call(case, method, inp)(), _tiny_call(case, SDPA, inp)(), case.dtype,
                               f"{method} on {case.id}")
        common.skip_if_refused(check, method)
    n, h, l, s, e = (case[x] for x in "NHLSE")
    common.measure(benchmark, _tiny_call(case, method, inp), case, method, baseline=SDPA,
                   flops=common.attention_flops(n, h, l, s, e, backward=case.backward),
                   extra={"sweep": TINY, "target_ratio": 1 / 1.5})


@pytest.mark.parametrize("case,method", _module_params())
def test_module(benchmark, case: Case, method: str):
    inp = _LAST.get(case.id, lambda: _module_inputs(case))
    peer = _module_peer(case)
    extra = {"sweep": MODULES, "target_ratio": 1.0, "dropout_p": 0.1 if case.pass_ == "train" else 0.0}
    if method != peer:
        common.skip_if_refused(lambda: _module_check(case, method, inp), method)
    call, module = _module_call(case, method, inp)
    if case.pass_ == "eval" and method == peer:
        extra["torch_fast_path"] = _torch_fused(module, inp["x"])
    common.measure(benchmark, call, case, method, baseline=peer, flops=_module_flops(case), extra=extra)


@pytest.mark.parametrize("limit,method", _limit_params())
def test_machine_limit(benchmark, limit: str, method: str):
    case = _limit_case(limit)
    extra = {"sweep": LIMITS, "limit": limit}
    if limit == "memory read bandwidth":
        t = torch.ones(MEM_MB * 2**20 // 4)
        want = float(t.numel())
        assert abs(t.sum().item() - want) <= 1e-3 * want
        fn, flops, extra["bytes"] = (lambda: t.sum()), 0.0, t.numel() * 4
    else:
        torch.manual_seed(0)
        a = torch.randn(GEMM_N, GEMM_N, dtype=case.dtype)
        b = torch.randn(GEMM_N, GEMM_N, dtype=case.dtype)
        flops = 2.0 * GEMM_N ** 3
        if method.startswith("numpy"):
            blas = _numpy_blas()
            if blas is None:
                pytest.skip("numpy is not installed (or does not say which BLAS it uses)")
            import numpy
            an, bn = a.numpy(), b.numpy()
            extra["blas"] = blas
            method = f"numpy.matmul fp32 ({blas})"
            fn = lambda: numpy.matmul(an, bn)  # noqa: E731
            common.check_close(torch.from_numpy(fn()[:64]), a[:64].double() @ b.double(), FP32, method)
        else:
            fn = lambda: torch.mm(a, b)  # noqa: E731
            common.check_close(fn()[:64], a[:64].double() @ b.double(), case.dtype, method)
    common.measure(benchmark, fn, case, method, baseline=method, flops=flops, extra=extra)
