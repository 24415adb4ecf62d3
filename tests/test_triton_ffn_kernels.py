"""The Triton feed-forward kernels (kernels/feed_forward.py) against a float64 torch computation.

Runs the launchers directly: under TRITON_INTERPRET=1 on CPU tensors (set by tests/conftest.py when
there is no GPU), on CUDA tensors otherwise. Bound, as flash-attention tests it:
    max|kernel - ref64| <= 2 * max|torch same dtype - ref64| + floor(dtype) * max(1, max|ref64|)
for the output and each of dx, dw1, db1, dw2, db2. Dropout uses the shared Philox stream
(fastattn._philox.ffn_keep_mask), so the kernel's mask must match it bit for bit.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from fastattn import _philox
from fastattn.reference import activation_fn
from fastattn.testing import check_bound, error_floor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 (CPU) or a CUDA GPU", allow_module_level=True)
triton = pytest.importorskip("triton")

from fastattn.kernels import feed_forward as ff  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
SEED = 0x5EED_1234_5678  # > 2**32: exercises both 32-bit halves of the Philox key


def torch_ffn(x, w1, b1, w2, b2, activation, p, seed):
    """Linear -> act -> dropout -> Linear in the dtype of the inputs, the shared Philox mask."""
    h = activation_fn(activation, F.linear(x, w1, b1))
    if p > 0:
        keep = _philox.ffn_keep_mask(seed, p, h.shape[0], h.shape[1], device=h.device)
        h = h * keep.to(h.dtype) / (1.0 - p)
    return F.linear(h, w2, b2)


def make_inputs(t, d, f, d2, dtype, bias=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    x = rnd(t, d)
    w1 = rnd(f, d, scale=d ** -0.5)
    b1 = rnd(f, scale=0.5) if bias else None
    w2 = rnd(d2, f, scale=f ** -0.5)
    b2 = rnd(d2, scale=0.5) if bias else None
    grad = rnd(t, d2)
    return x, w1, b1, w2, b2, grad


def grads_of(fn, inputs, grad):
    """output and (dx, dw1, db1, dw2, db2) of fn by autograd; a missing bias gets a zero grad slot."""
    leaves = [v.detach().clone().requires_grad_() if v is not None else None for v in inputs]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [v.grad if v is not None else None for v in leaves]


def seed_tensor(seed):
    return torch.tensor([seed], dtype=torch.int64)


def run_kernels(inputs, grad, activation, p, seed, **bwd_kwargs):
    x, w1, b1, w2, b2 = inputs
    s = seed_tensor(seed) if p > 0 else None
    out, saved = ff.ffn_forward(x, w1, b1, w2, b2, activation, p, s, True)
    grads = ff.ffn_backward(grad, x, w1, b1, w2, b2, saved, activation, p, s, **bwd_kwargs)
    return out, saved, list(grads)


def check_close(name, got, ref64, same, dtype):
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}"
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    # the floor scales with the magnitude of the result (sums over D or F terms)
    check_bound(name, got, same, ref64, floor=error_floor(dtype) * max(1.0, ref64.abs().max().item()))


def check_against_reference(t, d, f, d2, dtype, activation, p, bias=True, **bwd_kwargs):
    x, w1, b1, w2, b2, grad = make_inputs(t, d, f, d2, dtype, bias)
    inputs = (x, w1, b1, w2, b2)
    ref_fn = lambda *a: torch_ffn(*a, activation, p, SEED)  # noqa: E731
    ref_out, ref_grads = grads_of(ref_fn, [v.double() if v is not None else None for v in inputs], grad.double())
    same_out, same_grads = grads_of(ref_fn, list(inputs), grad)
    out, saved, grads = run_kernels(inputs, grad, activation, p, SEED, **bwd_kwargs)
    check_close("out", out, ref_out, same_out, dtype)
    check_close("saved pre-activation", saved, F.linear(x.double(), w1.double(), None if b1 is None else b1.double()),
                F.linear(x, w1, b1), dtype)
    for name, g, r, s in zip(("dx", "dw1", "db1", "dw2", "db2"), grads, ref_grads, same_grads):
        if r is None:  # no bias: still returned (test_no_bias_gradients_are_column_sums checks the values)
            assert tuple(g.shape) == ((f,) if name == "db1" else (d2,)), f"{name}: shape {tuple(g.shape)}"
            continue
        check_close(name, g, r, s, dtype)


# ---- correctness against float64 -----------------------------------------------------------------
@pytest.mark.parametrize("activation", ff.ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_fp32_matches_float64(activation, p):
    check_against_reference(33, 100, 250, 97, torch.float32, activation, p)


@pytest.mark.parametrize("t,d,f,d2", [(1, 100, 250, 100), (7, 97, 64, 97), (17, 8, 12, 5), (300, 16, 40, 24)],
                         ids=["T1", "T7-odd", "inner-dims-below-16", "T300-multipass-colsum"])
def test_fp32_shapes(t, d, f, d2):
    check_against_reference(t, d, f, d2, torch.float32, "gelu", 0.1)


@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_fp32_without_bias(activation):
    check_against_reference(33, 100, 64, 33, torch.float32, activation, 0.2, bias=False)


@pytest.mark.parametrize("dtype,activation,p", [(torch.float16, "gelu", 0.2), (torch.float16, "relu", 0.0),
                                                (torch.bfloat16, "gelu_tanh", 0.0), (torch.bfloat16, "relu", 0.3)],
                         ids=["fp16-gelu-drop", "fp16-relu", "bf16-gelu_tanh", "bf16-relu-drop"])
def test_half_precision_matches_float64(dtype, activation, p):
    check_against_reference(7, 97, 64, 33, dtype, activation, p)


def test_no_bias_gradients_are_column_sums():
    """db1/db2 are returned even without biases: the column sums of dPre and dOut."""
    x, w1, _, w2, _, grad = make_inputs(9, 20, 30, 11, torch.float32, bias=False)
    out, saved, (dx, dw1, db1, dw2, db2) = run_kernels((x, w1, None, w2, None), grad, "gelu", 0.0, SEED)
    torch.testing.assert_close(db2, grad.sum(0), rtol=1e-5, atol=1e-5)
    pre = saved.double().requires_grad_()
    F.linear(F.gelu(pre), w2.double()).backward(grad.double())
    torch.testing.assert_close(db1.double(), pre.grad.sum(0), rtol=1e-5, atol=1e-5)


# ---- the two ways dW2 gets H --------------------------------------------------------------------
@pytest.mark.parametrize("activation", ff.ACTIVATIONS)
def test_h_recomputed_in_prologue_equals_h_stored(activation):
    """dW2 from H recomputed in the GEMM prologue == dW2 from H written by the dH epilogue (bitwise),
    and both match float64."""
    check_against_reference(20, 48, 72, 40, torch.float16, activation, 0.0, h_in_prologue=True)
    x, w1, b1, w2, b2, grad = make_inputs(20, 48, 72, 40, torch.float16)
    _, _, g_pro = run_kernels((x, w1, b1, w2, b2), grad, activation, 0.0, SEED, h_in_prologue=True)
    _, _, g_epi = run_kernels((x, w1, b1, w2, b2), grad, activation, 0.0, SEED, h_in_prologue=False)
    for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), g_pro, g_epi):
        assert torch.equal(a, b), f"{name} differs between the prologue and the stored-H paths"


def test_h_strategy_choice():
    bf16 = torch.bfloat16
    assert ff._h_in_prologue("relu", 0.0, 768, bf16)
    assert not ff._h_in_prologue("relu", 0.0, 4096, bf16)
    assert not ff._h_in_prologue("relu", 0.1, 768, bf16)
    assert not ff._h_in_prologue("gelu", 0.0, 768, bf16)
    assert ff._h_in_prologue("gelu_tanh", 0.0, 100, bf16)
    assert not ff._h_in_prologue("relu", 0.0, 768, torch.float32)


@pytest.mark.parametrize("dtype,p", [(torch.float16, 0.1), (torch.float32, 0.0)])
def test_prologue_refuses_dropout_and_fp32(dtype, p):
    x, w1, b1, w2, b2, grad = make_inputs(4, 16, 16, 16, dtype)
    with pytest.raises(AssertionError):
        run_kernels((x, w1, b1, w2, b2), grad, "relu", p, SEED, h_in_prologue=True)


# ---- dropout ------------------------------------------------------------------------------------
def _hidden_through_identity(p, seed, t=48, f=64):
    """out = H when w2 = I and pre > 0 everywhere, so out shows the dropout mask and scale."""
    x = torch.rand(t, f, generator=torch.Generator().manual_seed(7), dtype=torch.float64).float().to(DEVICE)
    w1 = torch.eye(f, device=DEVICE)
    b1 = torch.full((f,), 1.0, device=DEVICE)
    w2 = torch.eye(f, device=DEVICE)
    out, saved = ff.ffn_forward(x, w1, b1, w2, None, "relu", p, seed_tensor(seed), True)
    return out, saved


def test_dropout_mask_is_the_shared_philox_stream():
    p = 0.3
    out, saved = _hidden_through_identity(p, SEED)
    keep = _philox.ffn_keep_mask(SEED, p, *out.shape).to(out.device)
    assert torch.equal(out != 0, keep), f"{int(((out != 0) != keep).sum())} mask bits differ from fastattn._philox"
    torch.testing.assert_close(out[keep], saved[keep] / (1 - p), rtol=1e-6, atol=0)


def test_dropout_reproducible_and_seeded():
    p = 0.5
    a, _ = _hidden_through_identity(p, 1234)
    b, _ = _hidden_through_identity(p, 1234)
    c, _ = _hidden_through_identity(p, 1235)
    assert torch.equal(a, b), "same seed gave different outputs"
    assert not torch.equal(a != 0, c != 0), "different seeds gave the same mask"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_kept_fraction(p):
    out, _ = _hidden_through_identity(p, 99, t=64, f=64)
    n = out.numel()
    kept = (out != 0).double().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma, f"kept fraction {kept:.4f}, expected {1 - p} +- {5 * sigma:.4f}"


def test_backward_regenerates_the_forward_mask():
    """with w2 = I the gradient reaching pre is zero exactly where the forward dropped."""
    p = 0.4
    out, saved = _hidden_through_identity(p, SEED, t=16, f=32)
    x = torch.zeros(16, 32, device=DEVICE)
    eye = torch.eye(32, device=DEVICE)
    grad = torch.ones(16, 32, device=DEVICE)
    dx, dw1, db1, dw2, db2 = ff.ffn_backward(grad, x, eye, None, eye, None, saved, "relu", p, seed_tensor(SEED))
    # dx = dPre @ w1 = dPre: 1/(1-p) where kept (pre > 0), 0 where dropped
    torch.testing.assert_close(dx, (out != 0).float() / (1 - p), rtol=1e-6, atol=0)


# ---- contract details ---------------------------------------------------------------------------
def test_save_for_backward_false_returns_empty():
    x, w1, b1, w2, b2, _ = make_inputs(5, 16, 24, 8, torch.float32)
    out_a, saved_a = ff.ffn_forward(x, w1, b1, w2, b2, "gelu", 0.0, None, False)
    out_b, saved_b = ff.ffn_forward(x, w1, b1, w2, b2, "gelu", 0.0, None, True)
    assert saved_a.shape == (0,) and saved_b.shape == (5, 24)
    assert torch.equal(out_a, out_b)


def test_zero_tokens():
    x, w1, b1, w2, b2, _ = make_inputs(0, 16, 24, 8, torch.float32)
    out, saved = ff.ffn_forward(x, w1, b1, w2, b2, "relu", 0.0, None, True)
    assert out.shape == (0, 8) and saved.shape == (0, 24)
    dx, dw1, db1, dw2, db2 = ff.ffn_backward(x.new_zeros(0, 8), x, w1, b1, w2, b2, saved, "relu", 0.0, None)
    assert dx.shape == (0, 16) and not dw1.any() and not db1.any() and not dw2.any() and not db2.any()


def test_backward_is_deterministic():
    x, w1, b1, w2, b2, grad = make_inputs(40, 24, 48, 16, torch.float32)
    _, _, g1 = run_kernels((x, w1, b1, w2, b2), grad, "gelu", 0.2, SEED)
    _, _, g2 = run_kernels((x, w1, b1, w2, b2), grad, "gelu", 0.2, SEED)
    for name, a, b in zip(("dx", "dw1", "db1", "dw2", "db2"), g1, g2):
        assert torch.equal(a, b), f"{name} differs between two identical calls"


def test_interpreter_uses_one_small_config():
    if not INTERPRET:
        pytest.skip("only meaningful under TRITON_INTERPRET=1")
    for kernel in ff.configs.FFN_KERNELS:
        for align in ff.configs.ALIGNMENTS:
            tile = ff.configs.ffn_config(kernel, "f16", align, 4096, 4096, 90)
            assert (tile.block_m, tile.block_n, tile.block_k) == (32, 32, 32), (kernel, align, tile)


def test_tables_cover_every_key_with_a_db1_granule_block():
    C = ff.configs
    for kernel in C.FFN_KERNELS:
        for dc in C.DTYPE_CLASSES:
            if kernel == "prologue" and dc != "f16":
                continue  # the prologue path is 16-bit only
            for key in ((kernel, dc, a, s, arch) for a in C.ALIGNMENTS for s in C.FFN_SIZES for arch in C.ARCH_FAMILIES):
                assert key in C.FFN, f"no tile for {key}"
                assert kernel != "dh" or C.FFN[key].block_m % ff.DB1_ROWS == 0
