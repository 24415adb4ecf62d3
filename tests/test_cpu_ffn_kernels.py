"""The CPU fused feed-forward kernels (csrc/cpu/feed_forward.cpp), called directly as
torch.ops.fastattn.ffn_fwd / ffn_bwd, against a float64 Linear -> activation -> dropout -> Linear
written here. Error bound as in the conformance matrix: |kernel - ref64| <= 2 * |torch same dtype -
ref64| + floor(dtype), for the output, the saved pre-activation and every gradient.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastattn  # noqa: F401  (loads fastattn._C: registers torch.ops.fastattn.*)
from fastattn import _philox
from fastattn.reference import activation_fn
from fastattn.testing import check_bound, error_floor
from helpers import assert_python_ok, counted

ffn_fwd = torch.ops.fastattn.ffn_fwd
ffn_bwd = torch.ops.fastattn.ffn_bwd

ACTIVATIONS = ["relu", "gelu", "gelu_tanh"]


@functools.lru_cache(maxsize=16)
def _keep_mask(seed: int, p: float, t: int, f: int) -> torch.Tensor:
    """The shared Philox keep mask (t, f); cached, as the pure-PyTorch Philox is slow."""
    return _philox.ffn_keep_mask(seed, p, t, f)


def _math(x, w1, b1, w2, b2, act, p, seed):
    """Linear -> act -> dropout -> Linear in the inputs' dtype (autograd-able); returns (out, pre)."""
    pre = F.linear(x, w1, b1)
    h = activation_fn(act, pre)
    if p > 0:
        keep = _keep_mask(int(seed[0]), p, x.shape[0], w1.shape[0])
        h = h * keep.to(h.dtype) * (1.0 / (1.0 - p))
    return F.linear(h, w2, b2), pre


def _make(T, D, Fh, D2, dtype, bias=True, scale=1.0):
    x = torch.randn(T, D, dtype=torch.float64)
    w1 = torch.randn(Fh, D, dtype=torch.float64) / D**0.5 * scale
    w2 = torch.randn(D2, Fh, dtype=torch.float64) / Fh**0.5
    b1 = torch.randn(Fh, dtype=torch.float64) * 0.5 if bias else None
    b2 = torch.randn(D2, dtype=torch.float64) * 0.5 if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [cast(t) for t in (x, w1, b1, w2, b2)]


def _check(name, got, ref64, same, dtype):
    """got within 2x torch's own same-dtype error of the float64 reference, plus a floor (fastattn.testing)."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    check_bound(name, got, same, ref64)


def _seed_for(p):
    return torch.tensor([1234567890123], dtype=torch.int64) if p > 0 else None


def _up(ts):
    return [None if t is None else t.double() for t in ts]


# ---- forward --------------------------------------------------------------------------------------

FWD_SHAPES = [  # (T, D, F, D2)
    (1, 100, 250, 100),
    (7, 97, 250, 97),
    (33, 768, 2048, 768),
    (300, 100, 2048, 100),
    (300, 97, 250, 5),
]


@pytest.mark.parametrize("shape", FWD_SHAPES, ids=lambda s: "T{}_D{}_F{}_D2{}".format(*s))
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_forward_fp32(shape, act, bias, p):
    T, D, Fh, D2 = shape
    args = _make(T, D, Fh, D2, torch.float32, bias)
    seed = _seed_for(p)
    out, saved = ffn_fwd(*args, act, p, seed, True)
    ref, pre_ref = _math(*_up(args), act, p, seed)
    same, pre_same = _math(*args, act, p, seed)
    _check("out", out, ref, same, torch.float32)
    _check("saved", saved, pre_ref, pre_same, torch.float32)
    out2, empty = ffn_fwd(*args, act, p, seed, False)
    assert empty.shape == (0,) and empty.dtype == torch.float32
    assert torch.equal(out, out2), "save_for_backward changed the output"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(7, 97, 250, 97), (300, 100, 2048, 100)], ids=["small", "tiles"])
def test_forward_other_dtypes(dtype, act, shape):
    T, D, Fh, D2 = shape
    p = 0.2
    args = _make(T, D, Fh, D2, dtype)
    seed = _seed_for(p)
    out, saved = ffn_fwd(*args, act, p, seed, True)
    ref, pre_ref = _math(*_up(args), act, p, seed)
    same, pre_same = _math(*args, act, p, seed)
    _check("out", out, ref, same, dtype)
    _check("saved", saved, pre_ref, pre_same, dtype)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_bits_exact(act, p):
    """With w2 = identity the output is the dropped hidden itself: its zero pattern must be the
    shared Philox keep mask bit for bit, and kept values act(pre) / (1 - p)."""
    T, D, Fh = 70, 16, 97  # two tiles, a row length that is no multiple of the vector width
    x = torch.randn(T, D)
    w1 = torch.randn(Fh, D) * 0.1
    b1 = torch.full((Fh,), 3.0)  # pre > 0, so act(pre) != 0 and a zero can only be dropout
    w2 = torch.eye(Fh)
    seed = torch.tensor([987654321], dtype=torch.int64)
    out, saved = ffn_fwd(x, w1, b1, w2, None, act, p, seed, True)
    keep = _keep_mask(987654321, p, T, Fh)
    assert torch.equal(out != 0, keep), f"{(( out != 0) != keep).sum().item()} dropout decisions differ"
    expect = activation_fn(act, saved.double()) / (1 - p)
    torch.testing.assert_close(out.double()[keep], expect[keep], rtol=2e-6, atol=1e-6)


def test_dropout_follows_seed():
    args = _make(40, 32, 64, 32, torch.float32)
    a, _ = ffn_fwd(*args, "relu", 0.5, torch.tensor([1], dtype=torch.int64), False)
    b, _ = ffn_fwd(*args, "relu", 0.5, torch.tensor([1], dtype=torch.int64), False)
    c, _ = ffn_fwd(*args, "relu", 0.5, torch.tensor([2], dtype=torch.int64), False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---- backward -------------------------------------------------------------------------------------

def _grads(args, act, p, seed, go):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in args]
    out, _ = _math(*leaves, act, p, seed)
    out.backward(go)
    return [None if t is None else t.grad for t in leaves]


BWD_SHAPES = [(1, 100, 250, 100), (7, 97, 250, 97), (33, 768, 2048, 768), (300, 100, 2048, 100)]


@pytest.mark.parametrize("shape", BWD_SHAPES, ids=lambda s: "T{}_D{}_F{}_D2{}".format(*s))
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_backward(shape, act, p, dtype):
    if dtype != torch.float32 and shape[2] == 2048 and shape[1] == 768:
        shape = (33, 97, 250, 97)  # keep the other dtypes' big case cheap
    T, D, Fh, D2 = shape
    args = _make(T, D, Fh, D2, dtype)
    seed = _seed_for(p)
    go = torch.randn(T, D2, dtype=torch.float64).to(dtype)
    _, saved = ffn_fwd(*args, act, p, seed, True)
    got = ffn_bwd(go, *args, saved, act, p, seed)
    ref = _grads(_up(args), act, p, seed, go.double())
    same = _grads(args, act, p, seed, go)
    for name, g, r, s in zip(["dx", "dw1", "db1", "dw2", "db2"], got, ref, same):
        _check(name, g, r, s, dtype)


def test_backward_without_biases_returns_bias_grads():
    args = _make(9, 20, 30, 11, torch.float32, bias=False)
    go = torch.randn(9, 11)
    _, saved = ffn_fwd(*args, "gelu", 0.0, None, True)
    dx, dw1, db1, dw2, db2 = ffn_bwd(go, *args, saved, "gelu", 0.0, None)
    assert db1.shape == (30,) and db2.shape == (11,)
    ref = _grads(_up([args[0], args[1], torch.zeros(30), args[3], torch.zeros(11)]), "gelu", 0.0, None, go.double())
    torch.testing.assert_close(db1.double(), ref[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db2.double(), ref[4], rtol=1e-4, atol=1e-5)


class _FusedFFN(torch.autograd.Function):
    """ffn_fwd / ffn_bwd as one differentiable function (for gradcheck)."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, act, p, seed):
        out, saved = ffn_fwd(x, w1, b1, w2, b2, act, p, seed, True)
        ctx.save_for_backward(x, w1, b1, w2, b2, saved)
        ctx.act, ctx.p, ctx.seed = act, p, seed
        return out

    @staticmethod
    def backward(ctx, go):
        x, w1, b1, w2, b2, saved = ctx.saved_tensors
        dx, dw1, db1, dw2, db2 = ffn_bwd(go.contiguous(), x, w1, b1, w2, b2, saved, ctx.act, ctx.p, ctx.seed)
        return dx, dw1, db1 if b1 is not None else None, dw2, db2 if b2 is not None else None, None, None, None


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.4], ids=["p0", "p0.4"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(act, p, bias):
    x, w1, b1, w2, b2 = (None if t is None else t.requires_grad_(True) for t in _make(5, 6, 9, 4, torch.float64, bias))
    seed = _seed_for(p)
    assert torch.autograd.gradcheck(lambda *a: _FusedFFN.apply(*a, act, p, seed),
                                    tuple(t for t in (x, w1, b1, w2, b2)), eps=1e-6, atol=1e-7)


def test_gradcheck_float64_many_tiles():
    """Enough tokens for several tiles and thread groups, so the partial sums are exercised."""
    x, w1, b1, w2, b2 = (t.requires_grad_(True) for t in _make(150, 3, 5, 2, torch.float64))
    assert torch.autograd.gradcheck(lambda *a: _FusedFFN.apply(*a, "gelu_tanh", 0.25, _seed_for(0.25)),
                                    (x, w1, b1, w2, b2), eps=1e-6, atol=1e-7, fast_mode=True)


# ---- determinism, inputs, threads, errors -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_and_inputs_untouched(dtype):
    T, D, Fh, D2 = 300, 97, 250, 97
    args = _make(T, D, Fh, D2, dtype)
    seed = _seed_for(0.2)
    go = torch.randn(T, D2).to(dtype)
    before = [t.clone() for t in args] + [go.clone(), seed.clone()]
    o1, s1 = ffn_fwd(*args, "gelu", 0.2, seed, True)
    g1 = ffn_bwd(go, *args, s1, "gelu", 0.2, seed)
    s1_copy = s1.clone()
    o2, s2 = ffn_fwd(*args, "gelu", 0.2, seed, True)
    g2 = ffn_bwd(go, *args, s2, "gelu", 0.2, seed)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    for a, b in zip(args + [go, seed], before):
        assert torch.equal(a, b), "an input was modified"
    assert torch.equal(s1, s1_copy), "ffn_bwd modified saved"


def _thread_results(thread_counts, args, act, p, T, D2, seed):
    """(out, saved, dx, dw1, db1, dw2, db2) under 1 and then 2 intra-op threads."""
    go = torch.randn(T, D2, generator=torch.Generator().manual_seed(seed)).to(args[0].dtype)
    sd = _seed_for(p)
    results = []
    for _ in thread_counts((1, 2)):
        out, saved = ffn_fwd(*args, act, p, sd, True)
        results.append((out, saved, *ffn_bwd(go, *args, saved, act, p, sd)))
    return results


FFN_OUTPUTS = ("y", "saved", "dx", "dw1", "db1", "dw2", "db2")

# tokens: one tile; a ragged last tile over 2 chunks; 41 tiles -> chunks of 2 tiles, waves of 2 threads
THREAD_TOKENS = [5, 100, 64 * 40 + 7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_thread_counts_bitwise(dtype, act, p, thread_counts):
    """Every output and gradient bitwise the same with 1 and 2 threads (issue 15 item 7): the weight and
    bias gradients are summed over fixed token chunks in chunk order, whatever the thread count."""
    for T in THREAD_TOKENS:
        args = _make(T, 24, 72, 20, dtype)
        a, b = _thread_results(thread_counts, args, act, p, T, 20, T)
        for name, x, y in zip(FFN_OUTPUTS, a, b):
            assert torch.equal(x, y), f"T={T}: {name} differs between 1 and 2 threads"


_THREADS_SCRIPT = """
import torch, fastattn
from fastattn import _philox
ffn_fwd, ffn_bwd = torch.ops.fastattn.ffn_fwd, torch.ops.fastattn.ffn_bwd
for dtype in (torch.float32, torch.bfloat16):
    for T in (5, 100, 64 * 40 + 7):
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, 24, generator=g).to(dtype)
        w1 = (torch.randn(72, 24, generator=g) * .2).to(dtype); b1 = torch.randn(72, generator=g).to(dtype)
        w2 = (torch.randn(20, 72, generator=g) * .2).to(dtype); b2 = torch.randn(20, generator=g).to(dtype)
        go = torch.randn(T, 20, generator=g).to(dtype)
        sd = torch.tensor([7], dtype=torch.int64)
        res = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out, saved = ffn_fwd(x, w1, b1, w2, b2, "gelu", 0.1, sd, True)
            res.append((out, saved) + tuple(ffn_bwd(go, x, w1, b1, w2, b2, saved, "gelu", 0.1, sd)))
        for name, a, b in zip(("y", "saved", "dx", "dw1", "db1", "dw2", "db2"), *res):
            assert torch.equal(a, b), f"{dtype} T={T}: {name} differs between 1 and 2 threads"
print("ok")
"""


@pytest.mark.parametrize("env", ["FASTATTN_FFN_NO_BRGEMM=1", "FASTATTN_CPU_BF16DOT=0", "FASTATTN_CPU_BF16DOT_FFN=mm"])
def test_thread_counts_bitwise_other_paths(env):
    """The paths chosen by environment (read once per process): the at::mm GEMM fallback, bf16 in the
    float32 kernel, and the bf16 whole-matrix matmul fallback are deterministic across thread counts too."""
    name, value = env.split("=")
    res = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT], env=dict(os.environ, **{name: value}),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_empty_tokens():
    args = _make(0, 8, 16, 4, torch.float32)
    out, saved = ffn_fwd(*args, "relu", 0.0, None, True)
    assert out.shape == (0, 4) and saved.shape == (0, 16)
    dx, dw1, db1, dw2, db2 = ffn_bwd(torch.zeros(0, 4), *args, saved, "relu", 0.0, None)
    assert dx.shape == (0, 8)
    for g in (dw1, db1, dw2, db2):
        assert torch.count_nonzero(g) == 0


def test_gemm_fallback_path_matches():
    """The at::mm fallback (a torch without the brgemm micro-kernel) gives the same meaning."""
    code = (
        "import torch, fastattn\n"
        "torch.manual_seed(0)\n"
        "x=torch.randn(70,33); w1=torch.randn(50,33)*.2; b1=torch.randn(50); w2=torch.randn(9,50)*.2\n"
        "out,s=torch.ops.fastattn.ffn_fwd(x,w1,b1,w2,None,'gelu',0.0,None,True)\n"
        "g=torch.ops.fastattn.ffn_bwd(torch.ones(70,9),x,w1,b1,w2,None,s,'gelu',0.0,None)\n"
        "xx=x.double().requires_grad_(); ww=w1.double().requires_grad_()\n"
        "r=torch.nn.functional.gelu(xx@ww.t()+b1.double())@w2.double().t(); r.sum().backward()\n"
        "assert (out.double()-r).abs().max()<1e-4, 'fwd'\n"
        "assert (g[0].double()-xx.grad).abs().max()<1e-4, 'dx'\n"
        "assert (g[1].double()-ww.grad).abs().max()<1e-3, 'dw1'\n"
        "print('ok')\n")
    assert_python_ok(code, FASTATTN_FFN_NO_BRGEMM="1")


# ---- bfloat16 forward on AMX (bf16 brgemm, VNNI-packed weights) ------------------------------------

_amx = torch.ops.fastattn_ffn
_needs_amx = pytest.mark.skipif(not _amx.amx_available(), reason="no AMX bf16 brgemm on this CPU/torch "
                                "(or FASTATTN_FFN_AMX=0)")

AMX_SHAPES = [  # (T, D, F, D2): odd D and F (VNNI zero pad), one token, ragged last tile, several tiles
    (1, 25, 33, 25),
    (17, 25, 33, 7),
    (200, 25, 33, 25),
    (200, 100, 2048, 100),
    (65, 64, 256, 31),
]


@_needs_amx
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=lambda s: "T{}_D{}_F{}_D2{}".format(*s))
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_bf16_amx(shape, act, p, bias):
    from fastattn.testing import check_bound
    T, D, Fh, D2 = shape
    args = _make(T, D, Fh, D2, torch.bfloat16, bias)
    seed = _seed_for(p)
    with counted(_amx.amx_fwd_calls, 2, "the bf16 AMX forward did not run"):
        out, saved = ffn_fwd(*args, act, p, seed, True)
        out2, _ = ffn_fwd(*args, act, p, seed, False)
    ref, pre_ref = _math(*_up(args), act, p, seed)
    same, pre_same = _math(*args, act, p, seed)
    assert out.dtype == torch.bfloat16 and saved.dtype == torch.bfloat16
    check_bound("out", out, same, ref, floor=error_floor(torch.bfloat16))
    check_bound("saved", saved, pre_same, pre_ref, floor=error_floor(torch.bfloat16))
    assert torch.equal(out, out2), "save_for_backward changed the output"
    if p > 0:  # dropped entries: with w2 = identity the zero pattern is the Philox keep mask
        w1, b1 = args[1], torch.full((Fh,), 3.0, dtype=torch.bfloat16)
        o, _ = ffn_fwd(args[0], w1 * 0.01, b1, torch.eye(Fh, dtype=torch.bfloat16), None, act, p, seed, False)
        assert torch.equal(o != 0, _keep_mask(int(seed[0]), p, T, Fh)), "dropout decisions differ"


@_needs_amx
@pytest.mark.parametrize("shape", AMX_SHAPES, ids=lambda s: "T{}_D{}_F{}_D2{}".format(*s))
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_backward_bf16_amx(shape, act, p):
    from fastattn.testing import check_bound
    T, D, Fh, D2 = shape
    args = _make(T, D, Fh, D2, torch.bfloat16, True)
    seed = _seed_for(p)
    go = torch.randn(T, D2, dtype=torch.float64).bfloat16().double()
    _, saved = ffn_fwd(*args, act, p, seed, True)
    with counted(_amx.amx_bwd_calls, 1, "the bf16 AMX backward did not run"):
        got = ffn_bwd(go.bfloat16(), *args[:1], args[1], args[2], args[3], args[4], saved, act, p, seed)
    ref = _grads(_up(args), act, p, seed, go)
    same = _grads(args, act, p, seed, go.bfloat16())
    for name, g, r, sm in zip(["dx", "dw1", "db1", "dw2", "db2"], got, ref, same):
        assert g.dtype == torch.bfloat16, f"{name}: dtype {g.dtype}"
        check_bound(name, g, sm, r, floor=error_floor(torch.bfloat16))


@_needs_amx
def test_forward_bf16_amx_off_switch():
    """FASTATTN_FFN_AMX=0 takes the float path (no AMX call) and means the same."""
    code = (
        "import torch, fastattn\n"
        "torch.manual_seed(0)\n"
        "x=torch.randn(70,33).bfloat16(); w1=(torch.randn(50,33)*.2).bfloat16(); w2=(torch.randn(9,50)*.2).bfloat16()\n"
        "out,_=torch.ops.fastattn.ffn_fwd(x,w1,None,w2,None,'relu',0.0,None,False)\n"
        "r=torch.relu(x.double()@w1.double().t())@w2.double().t()\n"
        "assert torch.ops.fastattn_ffn.amx_fwd_calls()==0, 'amx ran'\n"
        "assert not torch.ops.fastattn_ffn.amx_available(), 'available'\n"
        "assert (out.double()-r).abs().max()<0.05, 'fwd'\n"
        "print('ok')\n")
    assert_python_ok(code, FASTATTN_FFN_AMX="0")


@pytest.mark.parametrize("bad, match", [
    (dict(activation="swish"), "argument 'activation' got 'swish'; expected 'relu', 'gelu' or 'gelu_tanh'"),
    (dict(w1=torch.randn(16, 9)), "argument 'w1' got shape \\[16, 9\\]; expected \\(F, D\\) with D = 8"),
    (dict(w2=torch.randn(4, 15)), "argument 'w2' got shape \\[4, 15\\]; expected \\(D2, F\\) with F = 16"),
    (dict(b1=torch.randn(15)), "argument 'b1' got shape \\[15\\]; expected \\(16,\\)"),
    (dict(b2=torch.randn(5)), "argument 'b2' got shape \\[5\\]; expected \\(4,\\)"),
    (dict(w1=torch.randn(16, 8, dtype=torch.float64)), "argument 'w1' got dtype float64; expected x's dtype float32"),
    (dict(x=torch.randn(3, 8, dtype=torch.float16)), "argument 'x' got dtype float16; expected float32, bfloat16 or"),
    (dict(x=torch.randn(8, 3).t()), "argument 'x' got strides \\[1, 3\\]; expected a contiguous tensor"),
    (dict(dropout_p=0.5, seed=None), "argument 'seed' got None"),
    (dict(dropout_p=1.0, seed=torch.tensor([1])), "argument 'dropout_p' got 1; expected a value in \\[0, 1\\)"),
    (dict(dropout_p=0.5, seed=torch.tensor([1.0])), "argument 'seed' got float32"),
])
def test_errors_name_the_argument(bad, match):
    # csrc/checks.h: "fastattn: argument 'X' got ...; expected ...", a ValueError
    kw = dict(x=torch.randn(3, 8), w1=torch.randn(16, 8), b1=torch.randn(16), w2=torch.randn(4, 16),
              b2=torch.randn(4), activation="relu", dropout_p=0.0, seed=None)
    kw.update(bad)
    with pytest.raises(ValueError, match="fastattn: " + match):
        ffn_fwd(kw["x"], kw["w1"], kw["b1"], kw["w2"], kw["b2"], kw["activation"], kw["dropout_p"], kw["seed"], False)


def test_backward_checks_saved():
    x, w1, b1, w2, b2 = _make(3, 8, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="argument 'saved' got shape \\[0\\]"):
        ffn_bwd(torch.randn(3, 4), x, w1, b1, w2, b2, torch.empty(0), "relu", 0.0, None)
    with pytest.raises(ValueError, match="argument 'grad_out' got shape \\[3, 5\\]; expected \\(T, D2\\) = \\(3, 4\\)"):
        ffn_bwd(torch.randn(3, 5), x, w1, b1, w2, b2, torch.empty(3, 16), "relu", 0.0, None)
