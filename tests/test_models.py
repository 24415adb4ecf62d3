"""fastattn.models.TextClassifier, and fastattn.convert() on it: same logits and gradients as before."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastattn.testing import check_peer
import fastattn
from fastattn.demo import resolved_backend
from fastattn.models import TextClassifier
from fastattn.modules import MultiheadAttention, TransformerEncoderLayer, convert

VOCAB = 50


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (tests/conftest.py)


def _batch(seq_len=9, batch=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([seq_len, 1, seq_len - 3, 4][:batch])
    tokens = torch.randint(2, VOCAB, (seq_len, batch), generator=gen)
    padding_mask = torch.arange(seq_len).unsqueeze(0) >= lengths.unsqueeze(1)  # (N, L) True = pad
    tokens = tokens.masked_fill(padding_mask.t(), 0)
    return tokens, padding_mask


def _model(dtype=torch.float32, dropout=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(embedding_dim=16, nhead=4, num_layers=2, dim_feedforward=24, num_classes=3, dropout=dropout,
                max_len=32)
    args.update(kw)
    return TextClassifier(VOCAB, **args).to(dtype)


def test_classifier_shapes_defaults_and_structure():
    model = TextClassifier(VOCAB)
    assert model.embedding.embedding_dim == 100
    enc = model.encoder
    assert isinstance(enc, nn.TransformerEncoder) and len(enc.layers) == 2
    layer = enc.layers[0]
    assert type(layer) is nn.TransformerEncoderLayer
    assert layer.self_attn.num_heads == 4 and not layer.self_attn.batch_first
    assert layer.linear1.out_features == 2048
    tokens, mask = _batch()
    assert model(tokens, mask).shape == (4, 1)
    assert model(tokens).shape == (4, 1)


def test_classifier_ignores_padded_tokens():
    model = _model().eval()
    tokens, mask = _batch()
    other = tokens.clone()
    other[mask.t()] = 7  # change only what is padding
    with torch.no_grad():
        check_peer("a mask hides the padding", model(other, mask), model(tokens, mask))
        assert not torch.allclose(model(other), model(tokens)), "without a mask the padding must count"


@pytest.mark.parametrize("bad, match", [
    (lambda t, m: (t.float(), m), "'tokens'"),
    (lambda t, m: (t[0], m), "'tokens'"),
    (lambda t, m: (t, m.t()), "'padding_mask'"),
    (lambda t, m: (t, m.int()), "'padding_mask'"),
    (lambda t, m: (torch.zeros(40, 4, dtype=torch.int64), None), "max_len"),
])
def test_classifier_bad_input_names_the_argument(bad, match):
    model = _model()
    tokens, mask = _batch()
    with pytest.raises(ValueError, match=match):
        model(*bad(tokens, mask))


def test_classifier_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="'embedding_dim' got 10"):
        TextClassifier(VOCAB, embedding_dim=10, nhead=4)


def _check_train_step(stock, fast, tokens, mask, labels, tol, grad_atol, grad_rtol, prefix=""):
    """One forward + cross-entropy backward of each model: the converted model's logits within tol of the
    stock model's, every parameter's gradient within (grad_atol, grad_rtol)."""
    outs = []
    for model in (stock, fast):
        logits = model(tokens, mask)
        F.cross_entropy(logits, labels).backward()
        outs.append(logits)
    check_peer("output", outs[1], outs[0], atol=tol, rtol=tol)
    grads_stock = dict(stock.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None, name
        check_peer(f"{prefix}grad of {name}", p.grad, grads_stock[name].grad, atol=grad_atol, rtol=grad_rtol)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_convert_classifier_same_logits_and_grads(mode, dtype, tol):
    stock = _model(dtype)
    stock.train(mode == "train")
    fast = convert(copy.deepcopy(stock), backend="reference")
    assert fast.training == (mode == "train")
    assert all(type(layer) is TransformerEncoderLayer for layer in fast.encoder.layers)
    assert all(type(layer.self_attn) is MultiheadAttention for layer in fast.encoder.layers)
    assert all(p.dtype == dtype and p.device.type == "cpu" for p in fast.parameters())
    assert fast.state_dict().keys() == stock.state_dict().keys()
    tokens, mask = _batch()
    _check_train_step(stock, fast, tokens, mask, torch.tensor([0, 2, 1, 2]), tol, tol, tol)


@pytest.mark.parametrize("backend", fastattn.available_backends())
def test_convert_classifier_every_backend(backend):
    """The converted classifier (float padding masks from nn.TransformerEncoder, head dim 4) on each
    backend usable here, float32, on the backend's device: logits and grads as the stock model's."""
    on_gpu = backend in ("cuda", "triton") and torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    tol = 2e-3 if on_gpu else 2e-5  # GPU kernels may use TF32 tensor cores for float32
    stock = _model(torch.float32).to(device).train()
    fast = convert(copy.deepcopy(stock), backend=backend)
    tokens, mask = (t.to(device) for t in _batch())
    _check_train_step(stock, fast, tokens, mask, torch.tensor([0, 2, 1, 2], device=device), tol, 2.5 * tol, 5 * tol,
                      f"{backend}: ")


def test_convert_classifier_in_place_keeps_mode_and_parameters():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither building, converting nor running it warns
        model = _model(torch.float64).eval()
        params = list(model.parameters())
        assert convert(model) is model
        tokens, mask = _batch()
        model(tokens, mask)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert not model.encoder.use_nested_tensor


def test_converted_classifier_trains_with_dropout():
    """Dropout > 0 in training runs the fused dropout paths and still learns one batch."""
    model = convert(_model(dropout=0.2), backend="reference").train()
    tokens, mask = _batch()
    labels = torch.tensor([0, 2, 1, 2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens, mask), labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < 0.5 * losses[0], losses


def _recording_backend(seen: dict):
    """A torch.compile backend (AOT autograd, no codegen) that records the ops of the fw/bw graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def recorder(kind):
        def compiler(gm, example_inputs):
            seen[kind] |= {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))


def test_compile_fullgraph_converted_classifier():
    """torch.compile(fullgraph=True) of the converted classifier: no graph break, same logits and grads,
    and (when the C++ kernels are built) forward and backward graphs that hold fastattn's ops whole."""
    torch._dynamo.reset()
    model = convert(_model(), backend=None).train()
    tokens, mask = _batch()
    seen = {"forward": set(), "backward": set()}
    compiled = torch.compile(model, fullgraph=True, backend=_recording_backend(seen), dynamic=False)
    want = model(tokens, mask)
    got = compiled(tokens, mask)
    check_peer("output", got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(tokens, mask).sum().backward()
    for name, p in model.named_parameters():
        check_peer(f"grad of {name}", grads[name], p.grad, atol=1e-5, rtol=1e-5)
    chosen = resolved_backend(None, torch.device("cpu"), model.embedding_dim // 4)
    if chosen != "reference":  # kernel backends are custom ops; the reference is plain torch math
        prefix = "triton_" if chosen == "triton" else ""
        for kind, ops in (("forward", ("attention_fwd", "ffn_fwd")), ("backward", ("attention_bwd", "ffn_bwd"))):
            for op in ops:
                name = f"fastattn.{prefix}{op}.default"
                assert name in seen[kind], f"{kind} graph lacks {name}: {sorted(seen[kind])}"


def test_models_reachable_from_package():
    assert fastattn.models.TextClassifier is TextClassifier
    assert fastattn.convert is convert


def test_convert_keeps_device_meta():
    """A model on the meta device stays there: convert never moves or copies parameters."""
    model = TextClassifier(VOCAB, embedding_dim=16, nhead=2, dim_feedforward=8).to("meta")
    convert(model)
    assert all(p.device.type == "meta" for p in model.parameters())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_convert_classifier_on_cuda_same_logits_and_grads():
    stock = _model(torch.float32).cuda().train()
    fast = convert(copy.deepcopy(stock))
    assert all(p.is_cuda for p in fast.parameters())
    tokens, mask = (t.cuda() for t in _batch())
    labels = torch.tensor([0, 2, 1, 2], device="cuda")
    outs = []
    for model in (stock, fast):
        logits = model(tokens, mask)
        F.cross_entropy(logits, labels).backward()
        outs.append(logits)
    check_peer("output", outs[1], outs[0], atol=2e-4, rtol=2e-4)
    grads_stock = dict(stock.named_parameters())
    for name, p in fast.named_parameters():
        check_peer(f"grad of {name}", p.grad, grads_stock[name].grad, atol=2e-4, rtol=2e-3)
