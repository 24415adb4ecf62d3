"""Dropout keys (fastattn/_philox.py new_seed and the kernels' (seed, offset)): CPU draws unchanged,
the CUDA path's generator arithmetic on a stand-in generator, the reference replaying any
(seed, offset), and the Triton kernels (interpreter on CPU tensors, or the GPU) reading the key from
a tensor with a nonzero counter offset and drawing exactly the reference's mask."""
from __future__ import annotations

import pytest
import torch

from fastattn import _philox
from fastattn.reference import attention_reference, ffn_reference
from fastattn.testing import check_bound

from conftest import backend_device

DEVICE = backend_device("triton")


class FakeCudaGenerator:
    """The part of torch.cuda's default generator new_seed's host fallback uses."""

    def __init__(self, seed, offset=0):
        self.seed, self.offset = seed, offset

    def initial_seed(self):
        return self.seed

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        self.offset = offset


def test_cpu_seed_is_drawn_as_before():
    """On the CPU (or without a device) a key is one draw of the CPU generator, as before: (1,) int64."""
    torch.manual_seed(3)
    a, b = _philox.new_seed(), _philox.new_seed("cpu", 1000)
    torch.manual_seed(3)
    assert a.shape == (1,) and a.dtype == torch.int64 and a.device.type == "cpu"
    assert torch.equal(a, torch.randint(0, 2**62, (1,), dtype=torch.int64))
    assert torch.equal(b, torch.randint(0, 2**62, (1,), dtype=torch.int64))


def test_generator_offsets_advance_by_whole_calls():
    gen = FakeCudaGenerator(seed=1234, offset=8)
    keys = [_philox.draw_from_generator(gen, _philox._increment(n)) for n in (10, 4, 1, 0)]
    assert keys == [(1234, 8), (1234, 20), (1234, 24), (1234, 28)]
    assert gen.offset == 32
    # consecutive calls use disjoint counter ranges [offset, offset + count)
    counts = (10, 4, 1, 1)
    for (_, off), (_, nxt), n in zip(keys, keys[1:], counts):
        assert off + n <= nxt


def test_new_seed_cuda_fallback_reads_and_advances_the_device_generator(monkeypatch):
    gens = (FakeCudaGenerator(7), FakeCudaGenerator(99, offset=40))
    monkeypatch.setattr(_philox, "_CUDA_SEED_OP", False)  # as without fastattn._C
    monkeypatch.setattr(torch.cuda, "default_generators", gens, raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(_philox, "_key_tensor", lambda vals, device: (torch.tensor(vals), str(device)))
    key, dev = _philox.new_seed("cuda:1", 2 * 3 * 17 * 33)
    assert dev == "cuda:1" and key.tolist() == [99, 40]
    assert gens[1].offset == 40 + 3368 and gens[0].offset == 0  # 3366 rounded up to a multiple of 4
    key, dev = _philox.new_seed("cuda", 5)  # no index: the current device
    assert dev == "cuda" and key.tolist() == [7, 0] and gens[0].offset == 8


def test_new_seed_fallback_refuses_graph_capture(monkeypatch):
    monkeypatch.setattr(_philox, "_CUDA_SEED_OP", False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capture"):
        _philox.new_seed("cuda:0", 16)


def test_reference_replays_any_offset():
    seed, off = 987654321, 1000003
    plain = _philox.attention_keep_mask(seed, 0.4, 1, 1, 1, off + 2 * 3 * 5 * 7).reshape(-1)
    shifted = _philox.attention_keep_mask(torch.tensor([seed, off]), 0.4, 2, 3, 5, 7)
    assert torch.equal(shifted.reshape(-1), plain[off:])
    assert torch.equal(_philox.attention_keep_mask(torch.tensor([seed, 0]), 0.4, 2, 3, 5, 7),
                       _philox.attention_keep_mask(torch.tensor([seed]), 0.4, 2, 3, 5, 7))
    ffn = _philox.ffn_keep_mask(torch.tensor([seed, off]), 0.4, 6, 35)
    assert torch.equal(ffn.reshape(-1), plain[off:])
    with pytest.raises(ValueError, match="'seed'"):
        _philox.attention_keep_mask(torch.tensor([1, 2, 3]), 0.4, 1, 1, 2, 2)


def _kernels():
    import importlib
    import sys
    from pathlib import Path
    try:
        return (importlib.import_module("fastattn.kernels.attention"),
                importlib.import_module("fastattn.kernels.feed_forward"))
    except ImportError:  # a checkout that was never installed: import kernels/ from the repo root
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        return importlib.import_module("kernels.attention"), importlib.import_module("kernels.feed_forward")


@pytest.mark.parametrize("offset", [0, 123457, 2**33 + 5], ids=["off0", "off123457", "off2^33"])
def test_triton_attention_reads_seed_and_offset(offset):
    attn, _ = _kernels()
    g = torch.Generator().manual_seed(5)
    n, h, l, s, e, p = 1, 2, 20, 24, 16, 0.3
    q, k, v = (torch.randn(n, h, x, e, generator=g).to(DEVICE) for x in (l, s, s))
    do = torch.randn(n, h, l, e, generator=g).to(DEVICE)
    kpm = torch.zeros(n, s, dtype=torch.bool, device=DEVICE)
    kpm[0, -3:] = True
    seed = torch.tensor([424242, offset], dtype=torch.int64, device=DEVICE)
    scale = e ** -0.5
    out, lse = attn.attention_forward(q, k, v, None, kpm, p, True, scale, seed)
    dq, dk, dv = attn.attention_backward(do, q, k, v, out, lse, None, kpm, p, True, scale, seed)
    qq, kk, vv = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qq, kk, vv, None, kpm, p, True, scale, seed=seed.cpu())
    grads = torch.autograd.grad(ref, (qq, kk, vv), do.double())
    q32, k32, v32 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    same = attention_reference(q32, k32, v32, None, kpm, p, True, scale, seed=seed.cpu(), upcast=False)
    same_grads = torch.autograd.grad(same, (q32, k32, v32), do)
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), (same,) + same_grads, (ref,) + grads):
        check_bound(name, a, t, r)
    if offset:
        other, _ = attn.attention_forward(q, k, v, None, kpm, p, True, scale, torch.tensor([424242], device=DEVICE))
        assert not torch.equal(other, out), "the counter offset must change the mask"


def test_triton_ffn_reads_seed_and_offset():
    _, ffn = _kernels()
    g = torch.Generator().manual_seed(6)
    t, d, f, p = 19, 16, 40, 0.25
    x = torch.randn(t, d, generator=g).to(DEVICE)
    w1, w2 = torch.randn(f, d, generator=g).to(DEVICE) / 4, torch.randn(d, f, generator=g).to(DEVICE) / 6
    b1, b2 = torch.randn(f, generator=g).to(DEVICE), torch.randn(d, generator=g).to(DEVICE)
    seed = torch.tensor([31337, 77777], dtype=torch.int64, device=DEVICE)
    out, _ = ffn.ffn_forward(x, w1, b1, w2, b2, "gelu", p, seed, False)
    ref = ffn_reference(*(a.double() for a in (x, w1, b1, w2, b2)), "gelu", p, seed=seed.cpu())
    same = ffn_reference(x, w1, b1, w2, b2, "gelu", p, seed=seed.cpu())
    check_bound("ffn out", out, same, ref, floor=1e-4)
    plain, _ = ffn.ffn_forward(x, w1, b1, w2, b2, "gelu", p, torch.tensor([31337], device=DEVICE), False)
    assert not torch.equal(plain, out), "the counter offset must change the mask"


def test_kernel_seed_argument_checked():
    seed_offset_tensor = _kernels()[0].seed_offset_tensor
    with pytest.raises(ValueError, match="argument 'seed' got torch.float32 tensor of shape \\(2,\\)"):
        seed_offset_tensor(torch.zeros(2), "cpu")
    with pytest.raises(ValueError, match="argument 'seed' got None"):
        seed_offset_tensor(None, "cpu")
    assert seed_offset_tensor(torch.tensor([5]), "cpu").tolist() == [5, 0]
    assert seed_offset_tensor(torch.tensor([5, 9]), "cpu").tolist() == [5, 9]
