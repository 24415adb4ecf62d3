"""The reference itself, checked against torch's own SDPA and modules, and the shared Philox stream."""
import pytest
import torch
import torch.nn.functional as F

from fastattn.testing import check_peer
from fastattn import _philox
from fastattn.reference import attention_reference, ffn_reference


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 8, 8), (1, 2, 16, 16, 25, 25), (2, 1, 9, 4, 16, 12)])
def test_attention_reference_matches_torch_sdpa(shape, mask, causal):
    n, h, l, s, e, ev = shape
    q, k = torch.randn(n, h, l, e, dtype=torch.float64), torch.randn(n, h, s, e, dtype=torch.float64)
    v = torch.randn(n, h, s, ev, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(l, s) < 0.8
        m[:, 0] = True  # no fully masked rows: torch gives NaN there, we give 0
    elif mask == "float":
        m = torch.randn(n, 1, l, s, dtype=torch.float64)
    ours = attention_reference(q, k, v, m, None, 0.0, causal)
    if causal and m is not None:  # torch's SDPA takes one or the other: fold causal into its mask
        keep = torch.ones(l, s, dtype=torch.bool).tril()
        m = (m & keep) if m.dtype == torch.bool else m.masked_fill(~keep, float("-inf"))
        causal = False
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal)
    check_peer("reference vs torch", ours, theirs)


def test_attention_reference_key_padding_matches_mha_convention():
    q, k, v = (torch.randn(2, 2, 4, 8, dtype=torch.float64) for _ in range(3))
    kpm = torch.tensor([[False, True, False, True], [False, False, False, True]])
    ours = attention_reference(q, k, v, None, kpm)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=~kpm[:, None, None, :])
    check_peer("reference vs torch", ours, theirs)


def test_attention_reference_gqa_matches_torch():
    q = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 7, 8, dtype=torch.float64), torch.randn(2, 2, 7, 8, dtype=torch.float64)
    check_peer("reference vs torch", attention_reference(q, k, v),
                               F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def test_fully_masked_rows_give_zero_and_zero_grad():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    out, lse = attention_reference(q, k, v, mask, return_lse=True)
    assert torch.equal(out[0, 0, 1], torch.zeros(4, dtype=torch.float64)) and torch.isinf(lse[0, 0, 1])
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, 1], torch.zeros(4, dtype=torch.float64))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_attention_reference_lse():
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    _, lse = attention_reference(q, k, v, return_lse=True)
    ref = torch.logsumexp(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    check_peer("reference vs torch", lse, ref.float())


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
def test_ffn_reference_matches_modules(act):
    lin1, lin2 = torch.nn.Linear(12, 30).double(), torch.nn.Linear(30, 7).double()
    fn = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU("tanh")}[act]
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    check_peer("reference vs torch", ffn_reference(x, lin1.weight, lin1.bias, lin2.weight, lin2.bias, act),
                               lin2(fn(lin1(x))))


def test_ffn_reference_dropout_uses_shared_stream():
    x = torch.randn(6, 5, dtype=torch.float64)
    w1, w2 = torch.randn(9, 5, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    seed = torch.tensor([12345])
    keep = _philox.ffn_keep_mask(12345, 0.4, 6, 9)
    expected = (F.relu(x @ w1.T) * keep / 0.6) @ w2.T
    check_peer("reference vs torch", ffn_reference(x, w1, None, w2, None, "relu", 0.4, seed), expected)


def test_philox_known_answer():
    # Philox4x32-10's published known-answer vector: counter 0, key 0 -> first word 0x6627e8d5.
    assert _philox_word(0, 0) == 0x6627E8D5
    # ... and the uniform map: 0x6627e8d5 is a positive int32, times 4.6566127342e-10 in float32.
    expected = torch.tensor(float(0x6627E8D5), dtype=torch.float32) * torch.tensor(4.6566127342e-10)
    assert torch.equal(_philox.philox_uniform(0, torch.tensor([0])), expected.reshape(1))


def _philox_word(seed, offset):
    """The raw first output word, through the same code path as philox_uniform (before the float map)."""
    import fastattn._philox as p

    c0 = torch.tensor([offset & 0xFFFFFFFF])
    c1 = torch.tensor([offset >> 32])
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for _ in range(10):
        hi_b, lo_b = p._mulhilo(p._ROUND_B, c2)
        hi_a, lo_a = p._mulhilo(p._ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + p._KEY_A) & 0xFFFFFFFF, (k1 + p._KEY_B) & 0xFFFFFFFF
    return int(c0[0])


def test_philox_matches_triton_rand():
    import triton
    import triton.language as tl

    @triton.jit
    def _rand(out, seed, base, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK).to(tl.int64) + base
        tl.store(out + tl.arange(0, BLOCK), tl.rand(seed, offs))

    out = torch.empty(128, device="cuda" if torch.cuda.is_available() else "cpu")
    seed, base = 2**40 + 977, 2**32 - 60  # crosses the 32-bit counter boundary
    _rand[(1,)](out, seed, base, BLOCK=128)
    ref = _philox.philox_uniform(seed, torch.arange(128, dtype=torch.int64) + base)
    assert torch.equal(out.cpu(), ref)
