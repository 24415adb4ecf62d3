"""Bad input gets a clear error naming the argument, what it got and what was expected; inputs are never
modified; forced backends that cannot serve explain why."""
import pytest
import torch

from fastattn.testing import check_peer
import fastattn
from fastattn import BackendError
from helpers import run_python

q = torch.randn(2, 3, 5, 8)
k = torch.randn(2, 3, 7, 8)
v = torch.randn(2, 3, 7, 6)


def _assert_names_argument(fn, good: dict, bad: dict, arg: str, expected: str):
    """fn(**good updated with bad) raises a ValueError that names `arg` and says `expected`."""
    with pytest.raises(ValueError) as err:
        fn(**{**good, **bad}, backend="reference")
    msg = str(err.value)
    assert f"'{arg}'" in msg and expected in msg, msg


SDPA_BAD = [
    (dict(query=torch.randn(5, 8)), "query", "4-D"),
    (dict(key=torch.randn(2, 3, 7)), "key", "4-D"),
    (dict(key=torch.randn(3, 3, 7, 8)), "key", "batch size"),
    (dict(key=torch.randn(2, 3, 7, 9)), "key", "head dim"),
    (dict(value=torch.randn(2, 3, 6, 6)), "value", "sequence length"),
    (dict(key=torch.randn(2, 2, 7, 8), value=torch.randn(2, 2, 7, 6)), "key", "enable_gqa"),
    (dict(key=k.double()), "key", "dtype"),
    (dict(query=q.int()), "query", "floating"),
    (dict(attn_mask=torch.ones(4, 7, dtype=torch.bool)), "attn_mask", "broadcastable"),
    (dict(attn_mask=torch.ones(5, 7, dtype=torch.int32)), "attn_mask", "bool"),
    (dict(attn_mask=torch.ones(1, 1, 1, 5, 7, dtype=torch.bool)), "attn_mask", "broadcastable"),
    (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), "key_padding_mask", "(batch, key length)"),
    (dict(key_padding_mask=torch.zeros(2, 7)), "key_padding_mask", "bool"),
    (dict(dropout_p=1.0), "dropout_p", "[0, 1)"),
    (dict(dropout_p=-0.1), "dropout_p", "[0, 1)"),
    (dict(scale=float("nan")), "scale", "finite"),
    (dict(query=torch.randn(2, 3, 0, 8)), "query", "sequence length"),
    (dict(query="not a tensor"), "query", "torch.Tensor"),
]


@pytest.mark.parametrize("bad,arg,expected", SDPA_BAD, ids=[f"{a}-{e}" for _, a, e in SDPA_BAD])
def test_attention_bad_input_names_argument(bad, arg, expected):
    _assert_names_argument(fastattn.scaled_dot_product_attention, dict(query=q, key=k, value=v), bad, arg, expected)


def test_gqa_heads_must_divide():
    with pytest.raises(ValueError, match="divisor"):
        fastattn.scaled_dot_product_attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8),
                                              torch.randn(1, 2, 4, 8), enable_gqa=True)


FFN_BAD = [
    (dict(x=torch.randn(4, 9)), "weight1", "match x's last dim"),
    (dict(weight1=torch.randn(20, 10, 1)), "weight1", "2-D"),
    (dict(weight2=torch.randn(10, 19)), "weight2", "weight1's 20 outputs"),
    (dict(bias1=torch.randn(19)), "bias1", "(20,)"),
    (dict(bias2=torch.randn(20)), "bias2", "(10,)"),
    (dict(weight1=torch.randn(20, 10).double()), "weight1", "dtype"),
    (dict(activation="swish"), "activation", "relu"),
    (dict(dropout_p=2.0), "dropout_p", "[0, 1)"),
    (dict(x=torch.ones(4, 10, dtype=torch.long)), "x", "floating"),
]


@pytest.mark.parametrize("bad,arg,expected", FFN_BAD, ids=[f"{a}-{e}" for _, a, e in FFN_BAD])
def test_ffn_bad_input_names_argument(bad, arg, expected):
    good = dict(x=torch.randn(4, 10), weight1=torch.randn(20, 10), bias1=torch.randn(20),
                weight2=torch.randn(10, 20), bias2=torch.randn(10), activation="relu")
    _assert_names_argument(fastattn.feed_forward, good, bad, arg, expected)


def test_unknown_backend():
    with pytest.raises(ValueError, match="'nope'; expected one of"):
        fastattn.scaled_dot_product_attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="unknown"):
        with fastattn.use_backend("nope"):
            pass


def test_forced_backend_lists_reasons():
    # float16 on the CPU C++ backend, and the CUDA backend on a CPU tensor: one error with the reasons.
    with pytest.raises(BackendError) as err:
        fastattn.scaled_dot_product_attention(q, k, v, backend="cuda")
    assert "'cuda'" in str(err.value) and "because" in str(err.value)


def test_use_backend_context_and_env():
    with fastattn.use_backend("reference"):
        out = fastattn.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 5, 6)
    code = ("import torch, fastattn\n"
            "try:\n"
            "    fastattn.scaled_dot_product_attention(torch.randn(1,1,2,4), torch.randn(1,1,2,4), torch.randn(1,1,2,4))\n"
            "except ValueError as e:\n"
            "    print('ERR', e)\n")
    res = run_python(code, timeout=120, FASTATTN_BACKEND="bogus")
    assert "FASTATTN_BACKEND" in res.stdout and "bogus" in res.stdout, res.stdout + res.stderr


def test_attn_mask_requiring_grad_goes_to_reference_and_gets_grad():
    mask = torch.randn(5, 7, requires_grad=True)
    out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    ref_mask = mask.detach().clone().requires_grad_()
    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask).sum().backward()
    check_peer("mask grad", mask.grad, ref_mask.grad)
