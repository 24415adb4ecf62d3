"""Layer and model benchmarks (issue 5's last rows, issue 2's classifier step), fp32 on the CPU:

- encoder layer eval: nn.TransformerEncoderLayer(d_model 100, 4 heads, ff 2048, batch_first) in
  eval mode under torch.no_grad() — torch's fused fast path — against fastattn.convert() of it
  per backend, on (N 32, L 256, 100);
- encoder layer train step: the same layers in train mode (dropout 0.1), forward + backward to the
  input and every parameter;
- classifier train step: fastattn.models.TextClassifier as built (stock torch layers) against
  fastattn.convert() of it: forward, BCE loss, backward, Adam step, with a padding mask.

Before timing, each fastattn module is checked against the torch one with dropout 0 (outputs and
gradients), so a timing is never of a wrong result.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import common
from common import CLASSIFIER_STOCK, TEL_EVAL, TEL_TRAIN, Case

FP32 = torch.float32
D_MODEL, NHEAD, DIM_FF, SEQ, BATCH, LAYERS, VOCAB = 100, 4, 2048, 256, 32, 2, 20000
SHAPE = (("N", BATCH), ("L", SEQ), ("D", D_MODEL), ("H", NHEAD), ("F", DIM_FF))

CASES = [
    Case("cpu", "encoder_layer", "eval", FP32, SHAPE),
    Case("cpu", "encoder_layer", "train", FP32, SHAPE),
    Case("cpu", "classifier", "train", FP32, SHAPE + (("layers", LAYERS),)),
]


def _baseline(case: Case) -> str:
    if case.op == "classifier":
        return CLASSIFIER_STOCK
    return TEL_EVAL if case.pass_ == "eval" else TEL_TRAIN


def _params():
    ps = []
    for case in CASES:
        if case.op == "classifier" and common.fastattn_module() is None:
            continue   # the classifier itself is fastattn.models.TextClassifier
        methods = [_baseline(case)]
        if common.fastattn_module() is not None:
            methods += [common.fastattn_method(b) for b in common.fastattn_backends(case.device)]
        ps += [pytest.param(case, m, id=f"{case.id}::{m}") for m in methods]
    return ps


def _flops(case: Case) -> float:
    layer = common.encoder_layer_flops(BATCH, SEQ, D_MODEL, NHEAD, DIM_FF, backward=case.backward)
    if case.op == "classifier":
        return LAYERS * layer + common.linear_flops(BATCH, D_MODEL, 1, backward=True)
    return layer


def _convert(module: nn.Module, backend: str) -> nn.Module:
    """fastattn.convert of a copy (convert shares Parameters with its argument)."""
    return common.fastattn_module().convert(copy.deepcopy(module), backend=backend)


def uses_torch_fast_path(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether a stock layer's eval call runs torch's fused encoder kernel (seen in the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer(x)
    return any("_transformer_encoder_layer_fwd" in e.name for e in prof.events())


# -- encoder layer ----------------------------------------------------------------------------------
def _layer(dropout: float) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(D_MODEL, NHEAD, DIM_FF, dropout=dropout, batch_first=True)


def _layer_inputs(case: Case):
    torch.manual_seed(0)
    stock = _layer(0.1)
    x = torch.randn(BATCH, SEQ, D_MODEL)
    g = torch.randn(BATCH, SEQ, D_MODEL)
    return {"stock": stock, "x": x, "g": g}


def _layer_check(case: Case, method: str, inp: dict) -> None:
    """The fastattn layer against torch's with dropout 0, in the case's mode."""
    ref = _layer(0.0)
    ref.load_state_dict(inp["stock"].state_dict())
    ours = _convert(ref, method[len("fastattn["):-1])
    x = inp["x"].clone().requires_grad_(case.backward)
    results = []
    for m in (ref, ours):
        m.train(case.pass_ == "train")
        if case.backward:
            out = m(x)
            results.append([out, *torch.autograd.grad(out, [x, *m.parameters()], inp["g"])])
        else:
            with torch.no_grad():
                results.append([m(x)])
    common.check_close(results[1], results[0], case.dtype, f"{method} on {case.id} (dropout 0)")


def _layer_call(case: Case, method: str, inp: dict):
    stock, x = inp["stock"], inp["x"]
    layer = stock if method == _baseline(case) else _convert(stock, method[len("fastattn["):-1])
    if case.pass_ == "eval":
        layer.eval()

        def run():
            with torch.no_grad():
                return layer(x)
        return run, layer
    layer.train()
    xg = x.clone().requires_grad_(True)
    return common.grads_fn(lambda: layer(xg), [xg, *layer.parameters()], inp["g"]), layer


# -- classifier -------------------------------------------------------------------------------------
def _classifier(dropout: float):
    from fastattn.models import TextClassifier
    return TextClassifier(VOCAB, embedding_dim=D_MODEL, nhead=NHEAD, num_layers=LAYERS, dim_feedforward=DIM_FF,
                          num_classes=1, dropout=dropout)


def _classifier_inputs(case: Case):
    torch.manual_seed(0)
    stock = _classifier(0.1)
    tokens = torch.randint(1, VOCAB, (SEQ, BATCH))
    lengths = torch.randint(SEQ // 2, SEQ + 1, (BATCH,))
    pad = torch.arange(SEQ)[None, :] >= lengths[:, None]           # (N, L), True = padding
    tokens = tokens.masked_fill(pad.t(), 0)
    labels = torch.randint(0, 2, (BATCH,)).float()
    return {"stock": stock, "tokens": tokens, "pad": pad, "labels": labels}


def _loss(model, inp):
    logits = model(inp["tokens"], inp["pad"])
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), inp["labels"]), logits


def _classifier_check(case: Case, method: str, inp: dict) -> None:
    ref = _classifier(0.0)
    ref.load_state_dict(inp["stock"].state_dict())
    ours = _convert(ref, method[len("fastattn["):-1])
    results = []
    for m in (ref, ours):
        m.train()
        loss, logits = _loss(m, inp)
        results.append([logits, *torch.autograd.grad(loss, list(m.parameters()))])
    common.check_close(results[1], results[0], case.dtype, f"{method} on {case.id} (dropout 0)")


def _classifier_call(case: Case, method: str, inp: dict):
    model = copy.deepcopy(inp["stock"])
    if method != CLASSIFIER_STOCK:
        model = common.fastattn_module().convert(model, backend=method[len("fastattn["):-1])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = _loss(model, inp)
        loss.backward()
        opt.step()
        return loss
    return step, model


_LAST = common.LastCase()


@pytest.mark.parametrize("case,method", _params())
def test_layer(benchmark, case: Case, method: str):
    classifier = case.op == "classifier"
    inp = _LAST.get(case.id, lambda: (_classifier_inputs if classifier else _layer_inputs)(case))
    extra = {"dropout_p": 0.1}
    if method != _baseline(case):
        check = _classifier_check if classifier else _layer_check
        common.skip_if_refused(lambda: check(case, method, inp), method)
    call, module = (_classifier_call if classifier else _layer_call)(case, method, inp)
    if case.pass_ == "eval" and method == TEL_EVAL:
        extra["torch_fast_path"] = uses_torch_fast_path(module, inp["x"])
    common.measure(benchmark, call, case, method, baseline=_baseline(case), flops=_flops(case), extra=extra)
