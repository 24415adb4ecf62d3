"""GPU only (the device check's gpu-tests step): dropout keys come from the CUDA generator of the
input's device and are capture-safe. Under torch.cuda.graph capture, each replay draws a fresh mask
(the key is written on the device from the generator state of that replay), and a replay matches an
eager call made from the same generator state, bit for bit; the reference replays the mask from the
key the graph wrote. For the cuda and triton backends' attention and feed-forward ops."""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn import _philox
from fastattn.reference import attention_reference, ffn_reference
from fastattn.testing import check_bound

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = ["cuda", "triton"]


def _need(backend):
    if backend not in fastattn.available_backends():
        pytest.skip(f"backend {backend!r} not available here")
    if not _philox.setup_cuda_seed_op():
        pytest.skip("fastattn._C has no CUDA kernel for cuda_philox_seed (CUDA extension not built)")


def _attention_op(backend):
    return torch.ops.fastattn.attention_fwd if backend == "cuda" else torch.ops.fastattn.triton_attention_fwd


def _ffn_op(backend):
    return torch.ops.fastattn.ffn_fwd if backend == "cuda" else torch.ops.fastattn.triton_ffn_fwd


def test_cuda_philox_seed_reads_and_advances_the_generator():
    _need("cuda")
    x = torch.empty(0, device="cuda")
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.cuda.manual_seed(1234)
    a = torch.ops.fastattn.cuda_philox_seed(x, 40)
    b = torch.ops.fastattn.cuda_philox_seed(x, 8)
    assert a.device == x.device and a.dtype == torch.int64 and a.tolist() == [1234, 0]
    assert b.tolist() == [1234, 40] and gen.get_offset() == 48
    c = _philox.new_seed(x.device, 10)  # rounded up to 12
    assert c.tolist() == [1234, 48] and gen.get_offset() == 60
    with pytest.raises(RuntimeError, match="increment"):
        torch.ops.fastattn.cuda_philox_seed(x, 6)


def _capture(fn, warmup_inputs=None):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile / choose configs outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_graph_replays_draw_fresh_masks_and_match_eager(backend):
    _need(backend)
    n, h, l, s, e, p = 2, 3, 70, 90, 64, 0.3
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(n, h, x, e, device="cuda", generator=g, dtype=torch.float16) for x in (l, s, s))
    op, scale = _attention_op(backend), e ** -0.5

    def step():
        key = _philox.new_seed(q.device, n * h * l * s)
        return op(q, k, v, None, None, p, False, scale, key)[0], key

    graph, (out, key) = _capture(step)
    torch.cuda.manual_seed(11)
    graph.replay()
    first, first_key = out.clone(), key.clone()
    graph.replay()
    second, second_key = out.clone(), key.clone()
    assert first_key[0] == second_key[0] and second_key[1] > first_key[1], (first_key, second_key)
    assert not torch.equal(first, second), "a replay must draw a fresh dropout mask"
    # an eager call from the same generator state draws the same key and mask
    torch.cuda.manual_seed(11)
    eager, eager_key = step()
    assert torch.equal(eager_key, first_key)
    assert torch.equal(eager, first), "a replay must match an eager call from the same generator state"
    # and the reference replays the mask from the key the graph wrote
    ref = attention_reference(q.double(), k.double(), v.double(), None, None, p, False, scale, seed=first_key.cpu())
    same = attention_reference(q, k, v, None, None, p, False, scale, seed=first_key.cpu(), upcast=False)
    check_bound(f"{backend} graph replay", first, same, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_graph_replays_draw_fresh_masks_and_match_eager(backend):
    _need(backend)
    t, d, f, p = 77, 64, 256, 0.2
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(t, d, device="cuda", generator=g, dtype=torch.bfloat16)
    w1 = (torch.randn(f, d, device="cuda", generator=g) / 8).to(torch.bfloat16)
    w2 = (torch.randn(d, f, device="cuda", generator=g) / 16).to(torch.bfloat16)
    b1 = torch.randn(f, device="cuda", generator=g, dtype=torch.bfloat16)
    b2 = torch.randn(d, device="cuda", generator=g, dtype=torch.bfloat16)
    op = _ffn_op(backend)

    def step():
        key = _philox.new_seed(x.device, t * f)
        return op(x, w1, b1, w2, b2, "relu", p, key, False)[0], key

    graph, (out, key) = _capture(step)
    torch.cuda.manual_seed(21)
    graph.replay()
    first, first_key = out.clone(), key.clone()
    graph.replay()
    assert not torch.equal(first, out), "a replay must draw a fresh dropout mask"
    torch.cuda.manual_seed(21)
    eager, eager_key = step()
    assert torch.equal(eager_key, first_key) and torch.equal(eager, first)
    ref = ffn_reference(*(a.double() for a in (x, w1, b1, w2, b2)), "relu", p, seed=first_key.cpu())
    same = ffn_reference(x, w1, b1, w2, b2, "relu", p, seed=first_key.cpu())
    check_bound(f"{backend} ffn graph replay", first, same, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_api_dropout_follows_the_cuda_generator(backend):
    """Through fastattn.scaled_dot_product_attention: torch.cuda.manual_seed reproduces the mask,
    and the CPU random stream is not consumed by a CUDA call."""
    _need(backend)
    q, k, v = (torch.randn(1, 2, 50, 32, device="cuda", dtype=torch.float16) for _ in range(3))
    run = lambda: fastattn.scaled_dot_product_attention(q, k, v, dropout_p=0.25, backend=backend)  # noqa: E731
    torch.cuda.manual_seed(5)
    cpu_state = torch.get_rng_state()
    a = run()
    assert torch.equal(cpu_state, torch.get_rng_state()), "a CUDA dropout call must not draw from the CPU generator"
    torch.cuda.manual_seed(5)
    assert torch.equal(a, run())
    assert not torch.equal(a, run())
