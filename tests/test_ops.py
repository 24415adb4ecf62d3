"""The registered ops themselves: torch.library.opcheck on every op of every available backend (schema,
fake kernel, autograd registration, AOT dispatch), and torch.compile(fullgraph=True) through the API."""
import pytest
import torch

from fastattn.testing import check_peer
import fastattn
from fastattn import _philox
import importlib

from fastattn import attention as attention_family

from conftest import backend_device

ffn_family = importlib.import_module("fastattn.feed_forward")  # the module; fastattn.feed_forward is the function
OP_BACKENDS = [b for b in fastattn.available_backends() if b in ("cpu", "cuda", "triton")]


def _ops(family, backend):
    """The (forward, backward) registered ops a backend's kernels implement."""
    which = "triton" if backend == "triton" else "cpp"
    return family.FWD_OPS[which], family.BWD_OPS[which]


def _attention_args(device, dtype, variant):
    n, h, l, s, e = 2, 2, 9, 13, 16
    q = torch.randn(n, h, l, e, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(n, h, s, e, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(n, h, s, e, device=device, dtype=dtype, requires_grad=True)
    mask = kpm = seed = None
    p, causal = 0.0, False
    if variant == "masks":
        mask = torch.randn(l, s, device=device, dtype=dtype).expand(n, h, l, s)
        kpm = torch.rand(n, s, device=device) < 0.3
        causal = True
    elif variant == "dropout":
        p, seed = 0.2, _philox.new_seed()
    return (q, k, v, mask, kpm, p, causal, e ** -0.5, seed)


def _ffn_args(device, dtype, variant):
    x = torch.randn(11, 24, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(40, 24, device=device, dtype=dtype, requires_grad=True)
    b1 = torch.randn(40, device=device, dtype=dtype, requires_grad=True)
    w2 = torch.randn(24, 40, device=device, dtype=dtype, requires_grad=True)
    b2 = None if variant == "nobias" else torch.randn(24, device=device, dtype=dtype, requires_grad=True)
    p, seed = (0.2, _philox.new_seed()) if variant == "dropout" else (0.0, None)
    return (x, w1, b1, w2, b2, "gelu", p, seed, True)


def _opcheck(family, backend, args, bwd_args):
    """opcheck of the backend's forward op on args, then of its backward op on bwd_args(args, *outputs)."""
    fwd, bwd = _ops(family, backend)
    torch.library.opcheck(fwd, args)
    with torch.no_grad():
        outputs = fwd(*args)
    torch.library.opcheck(bwd, bwd_args(args, *outputs))


@pytest.mark.parametrize("variant", ["plain", "masks", "dropout"])
@pytest.mark.parametrize("backend", [b for b in OP_BACKENDS if b in fastattn.available_backends("attention")])
def test_opcheck_attention(backend, variant):
    def bwd_args(args, out, lse):
        q, k, v = (t.detach() for t in args[:3])
        return (torch.randn_like(out), q, k, v, out, lse) + args[3:]

    _opcheck(attention_family, backend, _attention_args(backend_device(backend), torch.float32, variant), bwd_args)


@pytest.mark.parametrize("variant", ["plain", "nobias", "dropout"])
@pytest.mark.parametrize("backend", [b for b in OP_BACKENDS if b in fastattn.available_backends("ffn")])
def test_opcheck_ffn(backend, variant):
    def bwd_args(args, out, saved):
        det = [None if t is None else t.detach() for t in args[:5]]
        return (torch.randn_like(out), *det, saved, *args[5:8])

    _opcheck(ffn_family, backend, _ffn_args(backend_device(backend), torch.float32, variant), bwd_args)


COMPILE_BACKENDS = [b for b in fastattn.available_backends() if backend_device(b) == "cpu" and b != "triton"]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_fullgraph_forward_and_backward(backend):
    """Dispatch is a compile-time constant and the ops are opaque: no graph breaks, same numbers."""
    torch._dynamo.reset()

    def block(q, k, v, kpm, x, w1, b1, w2, b2):
        a = fastattn.scaled_dot_product_attention(q, k, v, key_padding_mask=kpm, is_causal=True, backend=backend)
        f = fastattn.feed_forward(x, w1, b1, w2, b2, "gelu", backend=backend)
        return a.square().sum() + f.square().sum()

    q, k, v = (torch.randn(2, 4, 16, 25, requires_grad=True) for _ in range(3))
    kpm = torch.rand(2, 16) < 0.2
    x = torch.randn(2, 16, 32, requires_grad=True)
    w1, b1 = (torch.randn(64, 32) / 6).requires_grad_(), torch.randn(64, requires_grad=True)
    w2, b2 = (torch.randn(32, 64) / 8).requires_grad_(), torch.randn(32, requires_grad=True)
    leaves = (q, k, v, x, w1, b1, w2, b2)
    eager = block(q, k, v, kpm, x, w1, b1, w2, b2)
    eager_grads = torch.autograd.grad(eager, leaves)
    compiled = torch.compile(block, fullgraph=True)(q, k, v, kpm, x, w1, b1, w2, b2)
    grads = torch.autograd.grad(compiled, leaves)
    check_peer("compiled output", compiled, eager, rtol=1e-4, atol=1e-4)
    for g, ge in zip(grads, eager_grads):  # inductor may reorder the reference's float32 sums
        check_peer("compiled grad", g, ge, rtol=1e-3, atol=1e-3)
