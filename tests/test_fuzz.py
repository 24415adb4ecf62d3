"""Property-based fuzzing of attention and the feed-forward against float64 math written here.

Every backend available runs generated cases: shapes including 1 and primes, GQA, E != Ev, every mask
kind and broadcast shape, key padding, causality, non-contiguous and stride-0 inputs, extreme scales,
non-finite values in live and in excluded positions, 0-sized batch/heads; the cpu backend also with
1 and 2 threads compared bitwise. Seeded (derandomize=True) and bounded (a fixed number of examples
per backend, the Triton interpreter on small shapes), so the suite's time stays fixed.

The meaning checked (README, "Semantics"):
  * finite inputs: output and gradients within 2 x torch's same-dtype error + floor of float64 math;
  * a row with a non-finite value that takes part (q row, a visible key's k, a mask value other than
    -inf) is non-finite; keys excluded by key padding, a bool mask, -inf or causality take no part
    (a NaN in their k does not reach the output); a row that sees no key is 0;
  * N = 0 or H = 0 gives an empty result (and empty gradients); L, S, E = 0 is a clear error.
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastattn  # noqa: E402
from fastattn.backends import family_impls  # noqa: E402
from fastattn.testing import check_bound  # noqa: E402

from conftest import backend_device, interpreted  # noqa: E402

ATTN = fastattn.available_backends("attention")
FFN = fastattn.available_backends("ffn")
SIZES = (1, 2, 3, 5, 7, 13, 17)
SIZES_BIG = SIZES + (31, 64, 67)
HEAD_DIMS = (1, 2, 3, 5, 8, 13, 16)
HEAD_DIMS_BIG = HEAD_DIMS + (25, 32, 67)
EXAMPLES = {"cpu": 60, "triton": 10, "reference": 10, "cuda": 40}


def _settings(backend):
    return settings(max_examples=EXAMPLES.get(backend, 15), derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _dtypes(backend, kind="attention"):
    """The dtypes the backend declares it serves for `kind` (fp64 on cpu/reference only)."""
    want = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    served = family_impls(kind)[backend].dtypes
    return tuple(d for d in want if d in served)


@st.composite
def attention_cases(draw, backend):
    small = interpreted(backend)
    sizes = SIZES if small else SIZES_BIG
    dims = HEAD_DIMS if small else HEAD_DIMS_BIG
    c = dict(
        n=draw(st.sampled_from((1, 2))), hkv=draw(st.sampled_from((1, 2, 3))), group=draw(st.sampled_from((1, 2))),
        l=draw(st.sampled_from(sizes)), s=draw(st.sampled_from(sizes)),
        e=draw(st.sampled_from(dims)), ev=draw(st.sampled_from(dims)),
        dtype=draw(st.sampled_from(_dtypes(backend))),
        mask=draw(st.sampled_from(("none", "bool", "float", "float_inf"))),
        mshape=draw(st.sampled_from(("ls", "1s", "l1", "n1ls", "nhls", "1h1s"))),
        kpm=draw(st.booleans()), causal=draw(st.booleans()),
        scale=draw(st.sampled_from((None, None, 1e-3, 1.0, 8.0))),
        layout=draw(st.sampled_from(("contiguous", "transposed", "expanded"))),
        nonfinite=draw(st.sampled_from(("none",) * 5 + ("nan_q", "nan_k_live", "nan_k_excluded", "inf_mask"))),
        grads=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)),
    )
    return c


def _mask_shape(kind, n, h, l, s):
    return {"ls": (l, s), "1s": (1, s), "l1": (l, 1), "n1ls": (n, 1, l, s), "nhls": (n, h, l, s),
            "1h1s": (1, h, 1, s)}[kind]


def _layout(t, how):
    """Another memory layout: transposed storage, or batch 0 expanded over the batch (stride 0)."""
    if how == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "expanded":
        return t[:1].expand(t.shape)
    return t


def build(c, device):
    g = torch.Generator().manual_seed(c["seed"])
    n, hkv, hq, l, s = c["n"], c["hkv"], c["hkv"] * c["group"], c["l"], c["s"]
    q = torch.randn(n, hq, l, c["e"], generator=g, dtype=torch.float64)
    k = torch.randn(n, hkv, s, c["e"], generator=g, dtype=torch.float64)
    v = torch.randn(n, hkv, s, c["ev"], generator=g, dtype=torch.float64)
    mask = None
    if c["mask"] != "none":
        shape = _mask_shape(c["mshape"], n, hq, l, s)
        if c["mask"] == "bool":
            mask = torch.rand(shape, generator=g) > 0.25
        else:
            mask = torch.randn(shape, generator=g, dtype=torch.float64) * 3
            if c["mask"] == "float_inf":
                mask = mask.masked_fill(torch.rand(shape, generator=g) < 0.25, float("-inf"))
    kpm = (torch.rand(n, s, generator=g) < 0.3) if c["kpm"] else None
    excluded = _excluded(c, mask, kpm, n, hq, l, s)  # (n, hq, l, s) True = key excluded for that row
    nf = c["nonfinite"]
    if nf == "nan_q":
        q[0, 0, l // 2, 0] = float("nan")
    elif nf == "nan_k_live" or nf == "nan_k_excluded":
        # a key excluded for every row of kv head 0's group in batch 0 (or a live one)
        grp = excluded[0, :c["group"]].all(0).all(0) if nf == "nan_k_excluded" else \
            ~excluded[0, :c["group"]].all(0).all(0)
        cols = grp.nonzero().flatten()
        if len(cols):
            k[0, 0, cols[0], 0] = float("nan")
    elif nf == "inf_mask" and mask is not None and mask.dtype != torch.bool:
        mask = mask.clone()
        mask.view(-1)[0] = float("inf")
    dt = c["dtype"]
    q, k, v = (_layout(t.to(dt), c["layout"]).to(device) for t in (q, k, v))
    if mask is not None:
        mask = (mask if mask.dtype == torch.bool else mask.float() if dt != torch.float64 else mask).to(device)
    if kpm is not None:
        kpm = kpm.to(device)
    return q, k, v, mask, kpm


def _excluded(c, mask, kpm, n, h, l, s):
    ex = torch.zeros(n, h, l, s, dtype=torch.bool)
    if mask is not None:
        m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
        ex = ex | ((~m) if m.dtype == torch.bool else (m == float("-inf"))).expand(n, h, l, s)
    if kpm is not None:
        ex = ex | kpm[:, None, None, :]
    if c["causal"]:
        ex = ex | ~torch.ones(l, s, dtype=torch.bool).tril()
    return ex


def math64(q, k, v, mask, kpm, causal, scale, group):
    """fastattn's meaning in float64 (the dtype-rounded inputs, the mask as the kernels see it)."""
    q, k, v = (t.cpu().double() for t in (q, k, v))  # differentiable when they require grad
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n, h, l, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    sc = q @ k.transpose(-1, -2) * scale
    ex = _excluded({"causal": causal}, None if mask is None else mask.cpu(), None if kpm is None else kpm.cpu(),
                   n, h, l, s)
    if mask is not None and mask.dtype != torch.bool:
        m = mask.cpu().double()
        sc = sc + torch.where(m == float("-inf"), 0.0, m)
    sc = torch.where(ex, float("-inf"), sc)
    mx = sc.amax(-1, keepdim=True)
    dead = mx == float("-inf")
    p = torch.where(ex, 0.0, torch.exp(sc - torch.where(dead, 0.0, mx)))
    p = p / torch.where(dead, 1.0, p.sum(-1, keepdim=True))
    return p @ v


def torch_same_dtype(q, k, v, mask, kpm, causal, scale, group):
    """torch's SDPA in the tested dtype, the yardstick of the error bound (fully masked rows -> 0)."""
    q, k, v = (t.detach().cpu() for t in (q, k, v))
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n, h, l, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    ex = _excluded({"causal": causal}, None if mask is None else mask.cpu(), None if kpm is None else kpm.cpu(),
                   n, h, l, s)
    add = torch.zeros(n, h, l, s, dtype=q.dtype if q.dtype == torch.float64 else torch.float32)
    if mask is not None and mask.dtype != torch.bool:
        m = mask.cpu().to(add.dtype)
        add = add + torch.where(m == float("-inf"), 0.0, m)
    add = add.masked_fill(ex, float("-inf"))
    ts = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*ts, attn_mask=add.to(q.dtype) if q.dtype in (torch.float32, torch.float64) else add.to(q.dtype), scale=scale)
    return ts, out


def _check_attention(backend, c):
    dev = backend_device(backend)
    q, k, v, mask, kpm = build(c, dev)
    hq = q.shape[1]
    kw = dict(attn_mask=mask, key_padding_mask=kpm, is_causal=c["causal"], scale=c["scale"],
              enable_gqa=c["group"] > 1, backend=backend)
    ref = math64(q, k, v, mask, kpm, c["causal"], c["scale"], c["group"])
    want_grad = c["grads"] and c["nonfinite"] == "none"
    ins = [t.detach().requires_grad_(want_grad) for t in (q, k, v)]  # the layout as built
    out = fastattn.scaled_dot_product_attention(*ins, **kw)
    assert out.shape == ref.shape and out.dtype == q.dtype
    if c["nonfinite"] != "none":
        o = out.detach().cpu().double()
        bad_ref, bad_out = ~torch.isfinite(ref), ~torch.isfinite(o)
        assert torch.equal(bad_out, bad_ref), (
            f"non-finite pattern differs: fastattn {bad_out.nonzero().tolist()[:6]} vs math {bad_ref.nonzero().tolist()[:6]}")
        o, ref = o.masked_fill(bad_ref, 0.0), ref.masked_fill(bad_ref, 0.0)
        tol = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 1e-2}[q.dtype]
        torch.testing.assert_close(o, ref, atol=tol * (1 + ref.abs().max().item()), rtol=tol)
        return
    ts, tout = torch_same_dtype(q, k, v, mask, kpm, c["causal"], c["scale"], c["group"])
    dead = ref.abs().sum(-1, keepdim=True) == 0
    check_bound("out", out, torch.nan_to_num(tout.detach(), 0.0), ref)
    if want_grad:
        g = torch.Generator().manual_seed(c["seed"] + 1)
        go = torch.randn(out.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad(out, ins, go.to(out.dtype).to(out.device))
        r64 = [t.detach().cpu().double().requires_grad_(True) for t in (q, k, v)]
        ref2 = math64(*r64, mask, kpm, c["causal"], c["scale"], c["group"])
        rgrads = torch.autograd.grad(ref2, r64, go)
        tgrads = torch.autograd.grad(tout, ts, go.to(tout.dtype).masked_fill(dead, 0.0))
        if c["group"] > 1:
            tgrads = (tgrads[0],) + tuple(t.unflatten(1, (-1, c["group"])).sum(2) for t in tgrads[1:])
        for name, a, t, r in zip(("dq", "dk", "dv"), grads, tgrads, rgrads):
            check_bound(name, a, torch.nan_to_num(t, 0.0), r)
    if backend == "cpu":  # bitwise the same whatever the thread count
        before = torch.get_num_threads()
        try:
            res = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                ins2 = [t.detach().requires_grad_(True) for t in (q, k, v)]
                o = fastattn.scaled_dot_product_attention(*ins2, **kw)
                res.append([o.detach()] + list(torch.autograd.grad(o, ins2, torch.ones_like(o))))
        finally:
            torch.set_num_threads(before)
        for a, b in zip(*res):
            same = (a == b) | (torch.isnan(a) & torch.isnan(b))
            assert bool(same.all()), "results differ between 1 and 2 threads"
    del hq


@pytest.mark.parametrize("backend", ATTN)
def test_fuzz_attention(backend):
    @_settings(backend)
    @given(attention_cases(backend))
    def run(c):
        _check_attention(backend, c)

    run()


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("zero", ["n", "h"])
def test_empty_batch_or_heads(backend, zero):
    """N = 0 or H = 0: an empty result, forward and backward, on every backend."""
    dev = backend_device(backend)
    shape = dict(n=2, h=2, l=3, s=5, e=4)
    shape[zero] = 0
    q = torch.randn(shape["n"], shape["h"], shape["l"], shape["e"], device=dev, requires_grad=True)
    k = torch.randn(shape["n"], shape["h"], shape["s"], shape["e"], device=dev, requires_grad=True)
    v = torch.randn(shape["n"], shape["h"], shape["s"], 6, device=dev, requires_grad=True)
    out = fastattn.scaled_dot_product_attention(q, k, v, backend=backend)
    assert out.shape == (shape["n"], shape["h"], 3, 6)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for g, t in ((dq, q), (dk, k), (dv, v)):
        assert g is None or g.shape == t.shape


@pytest.mark.parametrize("backend", ATTN)
@pytest.mark.parametrize("zero", ["l", "s", "e"])
def test_empty_sequence_or_head_dim_is_a_clear_error(backend, zero):
    dev = backend_device(backend)
    shape = dict(l=3, s=5, e=4)
    shape[zero] = 0
    q = torch.randn(1, 1, shape["l"], shape["e"], device=dev)
    k = torch.randn(1, 1, shape["s"], shape["e"], device=dev)
    v = torch.randn(1, 1, shape["s"], 6, device=dev)
    with pytest.raises(ValueError, match=r"fastattn: argument '(query|key)'"):
        fastattn.scaled_dot_product_attention(q, k, v, backend=backend)


# ---- feed-forward ------------------------------------------------------------------------------------
@st.composite
def ffn_cases(draw, backend):
    small = interpreted(backend)
    dims = (1, 2, 3, 7, 13, 16) if small else (1, 2, 3, 7, 13, 16, 31, 64)
    return dict(t=draw(st.sampled_from((1, 2, 3, 5, 17) if small else (1, 2, 3, 5, 17, 67))),
                d=draw(st.sampled_from(dims)), f=draw(st.sampled_from(dims)), d2=draw(st.sampled_from(dims)),
                act=draw(st.sampled_from(("relu", "gelu", "gelu_tanh"))),
                dtype=draw(st.sampled_from(_dtypes(backend, "ffn"))), bias=draw(st.booleans()),
                nonfinite=draw(st.sampled_from(("none", "none", "none", "nan_x", "nan_b1", "inf_x"))),
                seed=draw(st.integers(0, 2 ** 16)))


def _check_ffn(backend, c):
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]
    x = torch.randn(c["t"], c["d"], generator=g, dtype=torch.float64)
    w1 = torch.randn(c["f"], c["d"], generator=g, dtype=torch.float64) / math.sqrt(c["d"])
    b1 = torch.randn(c["f"], generator=g, dtype=torch.float64) if c["bias"] or c["nonfinite"] == "nan_b1" else None
    w2 = torch.randn(c["d2"], c["f"], generator=g, dtype=torch.float64) / math.sqrt(c["f"])
    b2 = torch.randn(c["d2"], generator=g, dtype=torch.float64) if c["bias"] else None
    if c["nonfinite"] == "nan_x":
        x[c["t"] // 2, 0] = float("nan")
    elif c["nonfinite"] == "inf_x":
        x[0, c["d"] // 2] = float("inf")
    elif c["nonfinite"] == "nan_b1":
        b1[c["f"] // 2] = float("nan")
    ts = [None if t is None else t.to(dt) for t in (x, w1, b1, w2, b2)]
    ins = [None if t is None else t.to(dev).requires_grad_(True) for t in ts]
    y = fastattn.feed_forward(*ins, activation=c["act"], backend=backend)
    r64 = [None if t is None else t.double().requires_grad_(True) for t in ts]
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh")}[c["act"]]
    ref = torch.nn.functional.linear(act(torch.nn.functional.linear(r64[0], r64[1], r64[2])), r64[3], r64[4])
    go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    live = [i for i, t in enumerate(ins) if t is not None]
    grads = torch.autograd.grad(y, [ins[i] for i in live], go.to(dt).to(dev))
    rgrads = torch.autograd.grad(ref, [r64[i] for i in live], go)
    if c["nonfinite"] != "none":
        assert torch.equal(~torch.isfinite(y.detach().cpu()), ~torch.isfinite(ref.detach())), \
            "non-finite pattern of y differs from torch's"
        for i, a, r in zip(live, grads, rgrads):
            assert torch.equal(torch.isnan(a.cpu()), torch.isnan(r)), f"NaN pattern of grad {i} differs from torch's"
        return
    tin = [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]
    ty = torch.nn.functional.linear(act(torch.nn.functional.linear(tin[0], tin[1], tin[2])), tin[3], tin[4])
    tgrads = torch.autograd.grad(ty, [tin[i] for i in live], go.to(dt))
    check_bound("y", y, ty, ref)
    for i, a, t, r in zip(live, grads, tgrads, rgrads):
        check_bound(f"grad {('x', 'w1', 'b1', 'w2', 'b2')[i]}", a, t, r)


@pytest.mark.parametrize("backend", FFN)
def test_fuzz_ffn(backend):
    @settings(max_examples=EXAMPLES.get(backend, 15) // 2, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(ffn_cases(backend))
    def run(c):
        _check_ffn(backend, c)

    run()
