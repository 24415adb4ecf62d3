"""The C++ CPU attention kernels, called directly through torch.ops.fastattn.attention_fwd/_bwd.

Ground truth is a float64 computation written here from the contract (fastattn/backends/README.md):
additive attn_mask, key_padding_mask (True = ignore), top-left causal, GQA, dropout from the shared
Philox stream (fastattn._philox.attention_keep_mask), rows that see no key -> out 0, lse +inf,
gradients 0. Error bound as the conformance matrix: |out - ref64| <= 2 * |same_dtype - ref64| + floor.
"""
from __future__ import annotations

import glob
import importlib.util
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


import fastattn  # noqa: E402,F401  (defines the ops and loads fastattn._C's kernels)
from fastattn import _philox as philox  # noqa: E402
from fastattn.testing import check_bound, error_floor  # noqa: E402
from fastattn.attention import mask_dtype  # noqa: E402
import helpers  # noqa: E402
fwd_op = torch.ops.fastattn.attention_fwd
bwd_op = torch.ops.fastattn.attention_bwd



# ------------------------------------------------------------------------------------------------
# float64 math of the contract


def reference(q, k, v, mask=None, kpm=None, p=0.0, causal=False, scale=None, seed=None, dtype=torch.float64):
    """(out, lse) computed in `dtype` with plain torch ops; differentiable in q, k, v."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    n, hq, l, e = q.shape
    hkv, s = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(e) if scale is None else scale
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    sc = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        sc = sc + mask.to(dtype)
    if causal:
        tri = torch.ones(l, s, dtype=torch.bool).tril()
        sc = sc.masked_fill(~tri, -math.inf)
    if kpm is not None:
        sc = sc.masked_fill(kpm[:, None, None, :], -math.inf)
    m = sc.amax(-1, keepdim=True).detach()
    msafe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    ex = torch.exp(sc - msafe)
    den = ex.sum(-1, keepdim=True)
    pr = ex / torch.where(den > 0, den, torch.ones_like(den))
    lse = torch.where(den > 0, msafe + torch.log(den), torch.full_like(den, math.inf)).squeeze(-1)
    if p > 0:
        keep = philox.attention_keep_mask(int(seed.item()), p, n, hq, l, s)
        pr = pr * keep.to(dtype) / (1 - p)
    return pr @ v, lse


def expanded_mask(kind, n, h, l, s, dtype, gen):
    """helpers.expanded_mask for q of `dtype` (float32, float64 for float64 q), every query keeping its
    diagonal."""
    return helpers.expanded_mask(kind, n, h, l, s, mask_dtype(dtype), gen, dead_row=False)


def make(n, hq, hkv, l, s, e, ev, dtype, seed=0):
    q, k, v, gen = helpers.attention_inputs(n, hq, hkv, l, s, e, ev, dtype, seed)
    go = torch.randn(n, hq, l, ev, generator=gen).to(dtype)
    return q, k, v, go, gen


def ref_grads(q, k, v, go, dtype=torch.float64, **kw):
    qr, kr, vr = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = reference(qr, kr, vr, dtype=dtype, **kw)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), go.to(dtype))
    return out.detach(), lse, dq, dk, dv


def assert_close_bound(name, got, ref, same, dtype):
    """|got - ref| <= 2 |same - ref| + floor (fastattn.testing's bound), printing where it fails."""
    check_bound(name, got, same, ref, floor=error_floor(dtype))


def run_and_check(n, hq, hkv, l, s, e, ev, dtype, mask_kind="none", use_kpm=False, causal=False, p=0.0,
                  grads=True, seed=0):
    q, k, v, go, gen = make(n, hq, hkv, l, s, e, ev, dtype, seed)
    mask = expanded_mask(mask_kind, n, hq, l, s, dtype, gen)
    kpm = None
    if use_kpm:
        kpm = torch.rand(n, s, generator=gen) > 0.7
        kpm[:, 0] = False
    sd = torch.tensor([1234 + seed], dtype=torch.int64) if p > 0 else None
    scale = 1 / math.sqrt(e)
    kw = dict(mask=mask, kpm=kpm, p=p, causal=causal, scale=scale, seed=sd)
    out, lse = fwd_op(q, k, v, mask, kpm, p, causal, scale, sd)
    assert out.shape == (n, hq, l, ev) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (n, hq, l) and lse.dtype == torch.float32
    r_out, r_lse, r_dq, r_dk, r_dv = ref_grads(q, k, v, go, **kw)
    same_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    s_out, s_lse, s_dq, s_dk, s_dv = ref_grads(q, k, v, go, dtype=same_dtype, **kw)
    if dtype in (torch.bfloat16, torch.float16):
        # the same-dtype peer: torch's math in that dtype (outputs rounded to it)
        s_out, s_dq, s_dk, s_dv = (t.to(dtype) for t in (s_out, s_dq, s_dk, s_dv))
    assert_close_bound("out", out, r_out, s_out, dtype)
    fin = torch.isfinite(r_lse)
    assert torch.equal(torch.isfinite(lse), fin), "lse must be +inf exactly on rows that see no key"
    assert (lse[~fin] == math.inf).all()
    assert_close_bound("lse", lse[fin], r_lse[fin], s_lse[fin].float(), max(dtype, torch.float32, key=_rank))
    if not grads:
        return
    dq, dk, dv = bwd_op(go, q, k, v, out, lse, mask, kpm, p, causal, scale, sd)
    for name, g, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        assert g.shape == t.shape and g.dtype == dtype and g.is_contiguous(), name
    assert_close_bound("dq", dq, r_dq, s_dq, dtype)
    assert_close_bound("dk", dk, r_dk, s_dk, dtype)
    assert_close_bound("dv", dv, r_dv, s_dv, dtype)


def _rank(dt):
    return {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}[dt]


# ------------------------------------------------------------------------------------------------
# shapes

HEAD_DIMS = [1, 25, 64, 80, 128, 256]
SEQS = [(1, 1), (17, 17), (128, 128), (257, 257), (17, 130), (130, 17)]


@pytest.mark.parametrize("e", HEAD_DIMS)
@pytest.mark.parametrize("l,s", SEQS)
def test_shapes_fp32(e, l, s):
    run_and_check(1, 2, 2, l, s, e, e, torch.float32)


@pytest.mark.parametrize("e,ev", [(25, 7), (16, 64), (3, 130), (80, 25)])
def test_ev_differs_from_e(e, ev):
    run_and_check(2, 2, 2, 33, 70, e, ev, torch.float32, causal=True)


@pytest.mark.parametrize("mask_kind", ["none", "float2d", "bool2d", "per_batch", "full", "col"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_kpm", [False, True])
@pytest.mark.parametrize("l,s", [(70, 70), (40, 133), (133, 40)])
def test_masks(mask_kind, causal, use_kpm, l, s):
    run_and_check(2, 2, 2, l, s, 25, 25, torch.float32, mask_kind=mask_kind, use_kpm=use_kpm, causal=causal)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(hq, hkv, causal):
    run_and_check(2, hq, hkv, 45, 77, 25, 25, torch.float32, causal=causal, mask_kind="float2d")


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("mask_kind,causal,use_kpm", [("none", False, False), ("bool2d", True, True)])
def test_dropout(p, mask_kind, causal, use_kpm):
    run_and_check(2, 4, 2, 37, 70, 25, 20, torch.float32, mask_kind=mask_kind, causal=causal,
                  use_kpm=use_kpm, p=p)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,mask_kind", [(False, "none"), (True, "float2d")])
def test_dtypes(dtype, causal, mask_kind):
    run_and_check(2, 2, 2, 70, 90, 25, 25, dtype, causal=causal, mask_kind=mask_kind)


def test_long_keys_few_heads_split():
    # N * Hkv < 16: the backward splits keys into ranges and sums dQ partials in a fixed order
    run_and_check(1, 1, 1, 100, 700, 32, 32, torch.float32, causal=False, use_kpm=True)
    run_and_check(1, 2, 1, 300, 300, 25, 25, torch.float32, causal=True, mask_kind="float2d")


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_narrower_instruction_sets(isa, tuning_knob):
    tuning_knob("FASTATTN_CPU_ISA", isa)
    run_and_check(2, 4, 2, 45, 70, 25, 25, torch.float32, causal=True, mask_kind="bool2d", use_kpm=True)
    run_and_check(1, 2, 2, 33, 20, 80, 64, torch.float32, p=0.2)
    run_and_check(1, 2, 1, 20, 33, 7, 9, torch.float64, mask_kind="float2d")


# ------------------------------------------------------------------------------------------------
# rows that see no key


def test_fully_masked_rows():
    n, h, l, s, e = 2, 2, 20, 30, 25
    q, k, v, go, gen = make(n, h, h, l, s, e, e, torch.float32)
    mask = torch.zeros(n, h, l, s)
    mask[0, 1, 3] = -math.inf          # one row of one head
    mask[1, :, 7:9] = -math.inf        # two rows of every head
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[1, :] = True                   # batch 1 ignores every key: all its rows are empty
    kpm[1, 0] = False
    mask[1, :, :, 0] = -math.inf
    out, lse = fwd_op(q, k, v, mask, kpm, 0.0, False, 0.2, None)
    empty = torch.zeros(n, h, l, dtype=torch.bool)
    empty[0, 1, 3] = True
    empty[1] = True
    assert torch.equal(lse == math.inf, empty)
    assert (out[empty] == 0).all() and torch.isfinite(out).all()
    dq, dk, dv = bwd_op(go, q, k, v, out, lse, mask, kpm, 0.0, False, 0.2, None)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert (dq[empty] == 0).all()
    assert (dk[1] == 0).all() and (dv[1] == 0).all()
    r_out, r_lse, r_dq, r_dk, r_dv = ref_grads(q, k, v, go, mask=mask, kpm=kpm, scale=0.2)
    torch.testing.assert_close(out.double(), r_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(dq.double(), r_dq, atol=2e-5, rtol=0)
    torch.testing.assert_close(dk.double(), r_dk, atol=2e-5, rtol=0)
    torch.testing.assert_close(dv.double(), r_dv, atol=2e-5, rtol=0)


def test_every_key_padded_and_lowest_mask():
    # key padding of every key -> all rows empty; a finite lowest-value mask is NOT "no key"
    q, k, v, go, _ = make(1, 1, 1, 5, 6, 8, 8, torch.float32)
    kpm = torch.ones(1, 6, dtype=torch.bool)
    out, lse = fwd_op(q, k, v, None, kpm, 0.0, False, 0.3, None)
    assert (out == 0).all() and (lse == math.inf).all()
    mask = torch.full((1, 1, 5, 6), torch.finfo(torch.float32).min)
    out, lse = fwd_op(q, k, v, mask, None, 0.0, False, 0.3, None)
    r_out, _ = reference(q, k, v, mask=mask, scale=0.3)
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(out.double(), r_out, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# gradcheck in float64 through an autograd.Function over the two ops


class _Attn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, kpm, p, causal, scale, seed):
        out, lse = fwd_op(q, k, v, mask, kpm, p, causal, scale, seed)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (mask, kpm, p, causal, scale, seed)
        return out

    @staticmethod
    def backward(ctx, go):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = bwd_op(go.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None


@pytest.mark.parametrize("causal,mask_kind,use_kpm,p,hkv", [
    (False, "none", False, 0.0, 2),
    (True, "float2d", True, 0.0, 2),
    (False, "bool2d", False, 0.0, 1),
    (True, "none", False, 0.3, 1),
])
def test_gradcheck_float64(causal, mask_kind, use_kpm, p, hkv):
    n, hq, l, s, e, ev = 1, 2, 6, 9, 5, 3
    q, k, v, _, gen = make(n, hq, hkv, l, s, e, ev, torch.float64)
    mask = expanded_mask(mask_kind, n, hq, l, s, torch.float64, gen)
    kpm = None
    if use_kpm:
        kpm = torch.zeros(n, s, dtype=torch.bool)
        kpm[0, 2] = kpm[0, 7] = True
    seed = torch.tensor([77], dtype=torch.int64) if p > 0 else None
    args = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: _Attn.apply(a, b, c, mask, kpm, p, causal, 0.4, seed),
                                    args, eps=1e-6, atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# determinism, purity


THREAD_CASES = {  # (n, hq, hkv, l, s, e, mask kind, dropout, causal, scale)
    "few-heads-split-keys": (1, 2, 1, 150, 400, 25, "float2d", 0.2, True, 0.2),  # key ranges: dq partials
    "many-heads": (2, 16, 8, 70, 90, 32, "none", 0.0, False, None),  # one key range per (b, kv head)
    "large-logits": (1, 1, 1, 16, 32, 16, "none", 0.0, False, 20.0),  # split lse (bf16: the fp32 kernel)
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(THREAD_CASES))
def test_deterministic_across_runs_and_thread_counts(dtype, case, thread_counts):
    """Output, lse and every gradient bitwise the same with 1 and 2 threads, and on a repeat."""
    n, hq, hkv, l, s, e, mask_kind, p, causal, scale = THREAD_CASES[case]
    q, k, v, go, gen = make(n, hq, hkv, l, s, e, e, dtype)
    mask = expanded_mask(mask_kind, n, hq, l, s, dtype, gen)
    seed = torch.tensor([5], dtype=torch.int64) if p > 0 else None
    scale = 1 / math.sqrt(e) if scale is None else scale
    results = []
    for _ in thread_counts((1, 2, 1)):
        out, lse = fwd_op(q, k, v, mask, None, p, causal, scale, seed)
        grads = bwd_op(go, q, k, v, out, lse, mask, None, p, causal, scale, seed)
        results.append((out, lse) + tuple(grads))
    for other in results[1:]:
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), results[0], other):
            assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


def test_inputs_untouched_outputs_fresh():
    q, k, v, go, gen = make(2, 2, 2, 30, 40, 25, 25, torch.bfloat16)
    mask = expanded_mask("float2d", 2, 2, 30, 40, torch.bfloat16, gen)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[:, 5] = True
    seed = torch.tensor([9], dtype=torch.int64)
    before = [t.clone() for t in (q, k, v, go, mask, kpm, seed)]
    out, lse = fwd_op(q, k, v, mask, kpm, 0.1, True, 0.2, seed)
    lse_before, out_before = lse.clone(), out.clone()
    grads = bwd_op(go, q, k, v, out, lse, mask, kpm, 0.1, True, 0.2, seed)
    for a, b in zip(before, (q, k, v, go, mask, kpm, seed)):
        assert torch.equal(a, b)
    assert torch.equal(lse, lse_before) and torch.equal(out, out_before)
    inputs = {t.data_ptr() for t in (q, k, v, go, mask, kpm)}
    for t in (out, lse):
        assert t.is_contiguous() and t.data_ptr() not in inputs
    for t in grads:
        assert t.is_contiguous() and t.data_ptr() not in inputs | {out.data_ptr(), lse.data_ptr()}


def test_bad_arguments_name_themselves():
    # csrc/checks.h: "fastattn: argument 'X' got ...; expected ...", a ValueError
    q, k, v, _, _ = make(1, 2, 2, 8, 8, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="argument 'k' got head dim 3; expected q's head dim 4"):
        fwd_op(q, k[..., :3].contiguous(), v, None, None, 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'seed' got None; expected an int64 CPU tensor"):
        fwd_op(q, k, v, None, None, 0.5, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'k' got 2 heads; expected a divisor of q's 3 heads"):
        fwd_op(torch.randn(1, 3, 8, 4), k, v, None, None, 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'attn_mask' got dtype bool; expected an additive mask"):
        fwd_op(q, k, v, torch.zeros(1, 2, 8, 8, dtype=torch.bool), None, 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'q' got dtype int32; expected float32, float64, bfloat16 or"):
        fwd_op(q.int(), k.int(), v.int(), None, None, 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'v' got strides"):
        fwd_op(q, k, v.transpose(2, 3).contiguous().transpose(2, 3), None, None, 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'key_padding_mask' got shape"):
        fwd_op(q, k, v, None, torch.zeros(1, 7, dtype=torch.bool), 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'dropout_p' got 1; expected a value in"):
        fwd_op(q, k, v, None, None, 1.0, False, 1.0, torch.tensor([1]))
    out, lse = fwd_op(q, k, v, None, None, 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'lse' got float64"):
        bwd_op(out, q, k, v, out, lse.double(), None, None, 0.0, False, 1.0, None)
    with pytest.raises(ValueError, match="argument 'grad_out' got shape"):
        bwd_op(out[:, :1], q, k, v, out, lse, None, None, 0.0, False, 1.0, None)


def test_tuning_knobs_listed_and_checked(tuning_knob):
    from fastattn import _C

    knobs = _C.tuning_knobs()
    for name in ("FASTATTN_CPU_ISA", "FASTATTN_CPU_BM", "FASTATTN_CPU_BN", "FASTATTN_CPU_AMX", "FASTATTN_AMX_BM",
                 "FASTATTN_AMX_KC", "FASTATTN_FFN_AMX", "FASTATTN_FFN_NO_BRGEMM"):
        value, meaning = knobs[name]
        assert isinstance(meaning, str) and meaning, name
    tuning_knob("FASTATTN_CPU_BM", 32)
    assert _C.tuning_knobs()["FASTATTN_CPU_BM"][0] == 32
    tuning_knob("FASTATTN_CPU_ISA", "avx2")
    assert _C.tuning_knobs()["FASTATTN_CPU_ISA"][0] == "avx2"
    with pytest.raises(ValueError, match="FASTATTN_CPU_BM got '24'; expected an integer in \\[16, 512\\] that is a "
                                         "multiple of 16"):
        _C.set_tuning_knob("FASTATTN_CPU_BM", 24)
    with pytest.raises(ValueError, match="argument 'name' got 'FASTATTN_NOPE'"):
        _C.set_tuning_knob("FASTATTN_NOPE", 1)
    assert _C.tuning_knobs()["FASTATTN_CPU_BM"][0] == 32, "a rejected value must leave the knob as it was"


# ------------------------------------------------------------------------------------------------
# bfloat16 forward: the AVX512_BF16 dot-product path (when the CPU has it) and the float32 path


@pytest.mark.parametrize("dot", ["1", "0"])
@pytest.mark.parametrize("e,ev,l,s,causal,mask_kind,p", [
    (25, 25, 70, 37, False, "none", 0.0),     # odd E (packed K pairs), odd key count (padded pair)
    (64, 64, 130, 129, True, "float2d", 0.0),  # even E (K pairs read in place)
    (7, 12, 33, 50, True, "bool2d", 0.2),
    (1, 1, 5, 1, False, "none", 0.0),
])
def test_bf16_forward_paths(dot, e, ev, l, s, causal, mask_kind, p, monkeypatch):
    monkeypatch.setenv("FASTATTN_CPU_BF16DOT", dot)
    run_and_check(2, 2, 1, l, s, e, ev, torch.bfloat16, causal=causal, mask_kind=mask_kind, p=p, use_kpm=True)


@pytest.mark.parametrize("bm,bn", [(16, 7), (128, 33), (48, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sizes(bm, bn, dtype, tuning_knob):
    # every block size a tuner may pick gives the same meaning (edges: odd BN, BN=1, BM not % 64)
    tuning_knob("FASTATTN_CPU_BM", bm)
    tuning_knob("FASTATTN_CPU_BN", bn)
    run_and_check(1, 2, 2, 100, 75, 25, 19, dtype, causal=True, mask_kind="float2d", use_kpm=True)
