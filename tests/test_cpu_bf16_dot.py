"""bfloat16 on CPUs with AVX512_BF16 dot products but no AMX (csrc/cpu/attention_bf16dot.h,
csrc/cpu/ffn_bf16dot.h): attention forward and backward through torch.ops.fastattn.attention_fwd /
attention_bwd, the feed-forward through ffn_fwd / ffn_bwd.

Every case asserts through torch.ops.fastattn_bf16dot's counters that the dot-product path served
the call, so a silent fall back to the float32 kernels fails. Ground truth is float64
(fastattn.reference / a float64 Linear-act-Linear), the bound fastattn.testing.check_bound's:
|out - ref64| <= 2 |bf16 torch math - ref64| + floor. Skipped, with the reason, on a CPU without
avx512_bf16, on one with AMX (the AMX path serves bf16 there), or with FASTATTN_CPU_BF16DOT=0.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import fastattn  # noqa: F401  (loads fastattn._C, which registers the ops)
from fastattn.reference import attention_reference
from fastattn.testing import check_bound
from helpers import (assert_python_ok, attention_inputs, check_dead_rows, counted, expanded_mask,
                     key_padding, kw_id)

fwd_op = torch.ops.fastattn.attention_fwd
bwd_op = torch.ops.fastattn.attention_bwd
BF = torch.bfloat16
_dot = torch.ops.fastattn_bf16dot


def _amx_attn() -> bool:
    return hasattr(torch.ops, "fastattn_amx") and bool(torch.ops.fastattn_amx.available())


def _amx_ffn() -> bool:
    return hasattr(torch.ops, "fastattn_ffn") and bool(torch.ops.fastattn_ffn.amx_available())


if not _dot.cpu_has_bf16dot():
    _skip = "this CPU has no avx512_bf16 (vdpbf16ps)"
elif not _dot.available():
    _skip = "the bf16 dot-product path is switched off (FASTATTN_CPU_BF16DOT=0)"
else:
    _skip = None
pytestmark = pytest.mark.skipif(_skip is not None, reason=_skip or "")
needs_no_amx_attn = pytest.mark.skipif(_amx_attn(), reason="this CPU has AMX: bf16 attention runs on AMX")
needs_no_amx_ffn = pytest.mark.skipif(_amx_ffn(), reason="this CPU has AMX: the bf16 feed-forward runs on AMX")


def _decode_calls() -> int:
    dec = getattr(torch.ops, "fastattn_decode", None)
    try:
        return int(dec.fwd_calls()) if dec is not None else 0
    except (AttributeError, RuntimeError):
        return 0


def _ref_grads(q, k, v, m, pad, p, causal, scale, sd, go, upcast):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = attention_reference(*leaves, m, pad, p, causal, scale, sd, upcast=upcast)
    out.backward(go)
    return [t.grad for t in leaves]


def run_case(n=2, hq=2, hkv=2, l=17, s=17, e=64, ev=None, mask=None, kpm=False, causal=False, p=0.0, seed=0,
             backward=True):
    ev = e if ev is None else ev
    q, k, v, gen = attention_inputs(n, hq, hkv, l, s, e, ev, BF, seed)
    m = expanded_mask(mask, n, hq, l, s, torch.float32, gen)  # the mask dtype of bf16 q
    pad = key_padding(n, s, gen) if kpm else None
    sd = torch.tensor([4321 + seed], dtype=torch.int64) if p > 0 else None
    scale = 1 / math.sqrt(e)
    name = f"bf16dot n{n} hq{hq} hkv{hkv} l{l} s{s} e{e} ev{ev} mask={mask} kpm={kpm} causal={causal} p={p}"
    inputs = [t.clone() for t in (q, k, v)]
    before, before_dec = int(_dot.attn_fwd_calls()), _decode_calls()
    out, lse = fwd_op(q, k, v, m, pad, p, causal, scale, sd)
    served = int(_dot.attn_fwd_calls()) - before
    if l <= 16 and _decode_calls() == before_dec + 1:
        served += 1  # few query rows: the decoding path (attention_decode.cpp) serves the forward
    assert served == 1, "the bf16 dot-product forward did not serve the call"
    assert out.dtype == BF and out.shape == (n, hq, l, ev)
    m64 = None if m is None else m.double()
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), m64, pad, p, causal, scale, sd,
                                       return_lse=True)
    same = attention_reference(q, k, v, m, pad, p, causal, scale, sd, upcast=False)
    check_bound(name + " out", out, same, ref)
    check_dead_rows(name, out, lse, ref_lse)
    if not backward:
        return
    go = torch.randn(n, hq, l, ev, generator=gen).to(BF)
    with counted(_dot.attn_bwd_calls, 1, "the bf16 dot-product backward did not serve the call"):
        dq, dk, dv = bwd_op(go, q, k, v, out, lse, m, pad, p, causal, scale, sd)
    for a, b in zip(inputs, (q, k, v)):
        assert torch.equal(a, b), "the kernels modified an input"
    ref_g = _ref_grads(q.double(), k.double(), v.double(), m64, pad, p, causal, scale, sd, go.double(), True)
    same_g = _ref_grads(q, k, v, m, pad, p, causal, scale, sd, go, False)
    for gname, g, r, sm in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_g, same_g):
        assert g.dtype == BF
        check_bound(f"{name} {gname}", g, sm, r)


@needs_no_amx_attn
@pytest.mark.parametrize("e", [1, 25, 64, 80, 128, 256])
@pytest.mark.parametrize("ls", [(1, 1), (17, 17), (130, 70), (70, 130)], ids=lambda x: f"L{x[0]}S{x[1]}")
def test_head_dims_and_lengths(e, ls):
    run_case(l=ls[0], s=ls[1], e=e)


@needs_no_amx_attn
@pytest.mark.parametrize("kw", [
    dict(l=130, s=200, causal=True),
    dict(l=200, s=130, e=25, causal=True),
    dict(l=100, s=130, mask="float2d"),
    dict(l=100, s=130, mask="bool2d", kpm=True),
    dict(l=70, s=70, e=33, mask="full", causal=True),
    dict(l=70, s=90, mask="transposed", e=80),
    dict(l=65, s=150, kpm=True, e=128),
], ids=kw_id)
def test_masks_and_causal(kw):
    run_case(**kw)


@needs_no_amx_attn
@pytest.mark.parametrize("kw", [
    dict(hq=4, hkv=2, l=64, s=80, e=16),
    dict(hq=6, hkv=1, l=33, s=70, e=25, ev=7),
    dict(hq=4, hkv=1, l=130, s=130, e=64, causal=True, kpm=True),
], ids=kw_id)
def test_gqa(kw):
    run_case(**kw)


@needs_no_amx_attn
@pytest.mark.parametrize("kw", [
    dict(l=100, s=100, p=0.3),
    dict(l=130, s=150, e=25, p=0.2, causal=True, kpm=True),
], ids=kw_id)
def test_dropout(kw):
    run_case(**kw)


@needs_no_amx_attn
def test_key_ranges_split_in_backward():
    # one (batch, kv head): the backward splits the keys into ranges, dQ summed over them
    run_case(n=1, hq=1, hkv=1, l=70, s=300, e=64, causal=True)


@needs_no_amx_attn
def test_block_size_with_a_16_wide_tail(monkeypatch):
    # BM = 48: a 16-query tail in the bf16 rounding of P and dS rows
    monkeypatch.setenv("FASTATTN_CPU_BM", "48")
    run_case(l=100, s=90, e=25, causal=True)


@needs_no_amx_attn
def test_odd_key_block_falls_back():
    """Key pairs need an even BN: FASTATTN_CPU_BN=33 (a tuning knob, read once per process) takes the
    float32 kernels, correct and not counted."""
    code = (
        "import torch, fastattn\n"
        "from fastattn.reference import attention_reference\n"
        "from fastattn.testing import check_bound\n"
        "g = torch.Generator().manual_seed(3)\n"
        "q, k, v = (torch.randn(1, 2, 50, 24, generator=g).bfloat16() for _ in range(3))\n"
        "out, _ = torch.ops.fastattn.attention_fwd(q, k, v, None, None, 0.0, False, 0.2, None)\n"
        "assert torch.ops.fastattn_bf16dot.attn_fwd_calls() == 0, 'dot path ran with an odd BN'\n"
        "ref = attention_reference(q.double(), k.double(), v.double(), None, None, 0.0, False, 0.2, None)\n"
        "same = attention_reference(q, k, v, None, None, 0.0, False, 0.2, None, upcast=False)\n"
        "check_bound('odd BN out', out, same, ref)\n"
        "print('ok')\n")
    assert_python_ok(code, FASTATTN_CPU_BN="33")


def test_other_dtypes_do_not_take_the_dot_path():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    with counted(_dot.attn_fwd_calls, 0, "float32 / float16 took the bf16 dot-product path"):
        fwd_op(q, k, v, None, None, 0.0, False, 0.25, None)
        fwd_op(q.half(), k.half(), v.half(), None, None, 0.0, False, 0.25, None)


def test_float16_within_bound():
    # float16 is computed in float32 (converted per block) on every CPU: within the bound too
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 70, 25, generator=gen).half() for _ in range(3))
    out, _ = fwd_op(q, k, v, None, None, 0.0, True, 0.2, None)
    ref = attention_reference(q.double(), k.double(), v.double(), None, None, 0.0, True, 0.2, None)
    same = attention_reference(q, k, v, None, None, 0.0, True, 0.2, None, upcast=False)
    check_bound("fp16 out", out, same, ref)


def test_off_switch():
    """FASTATTN_CPU_BF16DOT=0 keeps bf16 off the dot-product path (read once, at the first call)."""
    code = (
        "import torch, fastattn\n"
        "q=torch.randn(1,2,40,64).bfloat16()\n"
        "torch.ops.fastattn.attention_fwd(q,q,q,None,None,0.0,False,0.125,None)\n"
        "x=torch.randn(70,33).bfloat16(); w1=(torch.randn(50,33)*.2).bfloat16(); w2=(torch.randn(9,50)*.2).bfloat16()\n"
        "torch.ops.fastattn.ffn_fwd(x,w1,None,w2,None,'relu',0.0,None,False)\n"
        "d=torch.ops.fastattn_bf16dot\n"
        "assert not d.available() and d.attn_fwd_calls()==0 and d.ffn_fwd_calls()==0, 'dot path ran'\n"
        "print('ok')\n")
    assert_python_ok(code, FASTATTN_CPU_BF16DOT="0")


# ---- feed-forward -----------------------------------------------------------------------------------

ffn_fwd = torch.ops.fastattn.ffn_fwd
ffn_bwd = torch.ops.fastattn.ffn_bwd
FFN_SHAPES = [(1, 25, 33, 25), (17, 25, 33, 7), (200, 100, 2048, 100), (65, 64, 256, 31)]


def _ffn_helpers():
    sys.path.insert(0, os.path.dirname(__file__))
    import test_cpu_ffn_kernels as t
    return t


@needs_no_amx_ffn
@pytest.mark.parametrize("shape", FFN_SHAPES, ids=lambda s: "T{}_D{}_F{}_D2{}".format(*s))
@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
def test_ffn_forward_backward(shape, act, p):
    t = _ffn_helpers()
    T, D, Fh, D2 = shape
    args = t._make(T, D, Fh, D2, BF, True)
    seed = t._seed_for(p)
    with counted(_dot.ffn_fwd_calls, 2, "the bf16 dot-product feed-forward did not serve the call"):
        out, saved = ffn_fwd(*args, act, p, seed, True)
        out2, _ = ffn_fwd(*args, act, p, seed, False)
    ref, pre_ref = t._math(*t._up(args), act, p, seed)
    same, pre_same = t._math(*args, act, p, seed)
    assert out.dtype == BF and saved.dtype == BF
    check_bound("out", out, same, ref)
    check_bound("saved", saved, pre_same, pre_ref)
    assert torch.equal(out, out2), "save_for_backward changed the output"
    go = torch.randn(T, D2, dtype=torch.float64).bfloat16().double()
    with counted(_dot.ffn_bwd_calls, 1, "the bf16 dot-product feed-forward backward did not run"):
        got = ffn_bwd(go.bfloat16(), *args, saved, act, p, seed)
    ref_g = t._grads(t._up(args), act, p, seed, go)
    same_g = t._grads(args, act, p, seed, go.bfloat16())
    for name, g, r, sm in zip(["dx", "dw1", "db1", "dw2", "db2"], got, ref_g, same_g):
        assert g.dtype == BF, f"{name}: dtype {g.dtype}"
        check_bound(name, g, sm, r)


@needs_no_amx_ffn
def test_ffn_without_biases():
    t = _ffn_helpers()
    args = t._make(40, 24, 70, 24, BF, False)
    out, saved = ffn_fwd(*args, "gelu", 0.0, None, True)
    ref, _ = t._math(*t._up(args), "gelu", 0.0, None)
    same, _ = t._math(*args, "gelu", 0.0, None)
    check_bound("out", out, same, ref)
    dx, dw1, db1, dw2, db2 = ffn_bwd(torch.ones(40, 24, dtype=BF), *args, saved, "gelu", 0.0, None)
    assert db1.shape == (70,) and db2.shape == (24,) and torch.equal(db2.float(), torch.full((24,), 40.0))


@needs_no_amx_ffn
def test_ffn_matmul_fallback():
    """FASTATTN_CPU_BF16DOT_FFN=mm: the whole-matrix oneDNN bf16 matmul fallback (for a torch without
    bf16 brgemm) serves the call and is within the bound, forward and backward."""
    code = (
        "import sys, os, torch, fastattn\n"
        "sys.path.insert(0, os.path.join(os.getcwd(), 'tests'))\n"
        "import test_cpu_ffn_kernels as t\n"
        "from fastattn.testing import check_bound\n"
        "torch.manual_seed(0)\n"
        "BF = torch.bfloat16; d = torch.ops.fastattn_bf16dot\n"
        "for act, p in (('gelu', 0.0), ('relu', 0.3)):\n"
        "    args = t._make(130, 40, 300, 24, BF, True); seed = t._seed_for(p)\n"
        "    out, saved = torch.ops.fastattn.ffn_fwd(*args, act, p, seed, True)\n"
        "    ref, _ = t._math(*t._up(args), act, p, seed); same, _ = t._math(*args, act, p, seed)\n"
        "    check_bound('out', out, same, ref)\n"
        "    go = torch.randn(130, 24, dtype=torch.float64).bfloat16().double()\n"
        "    got = torch.ops.fastattn.ffn_bwd(go.bfloat16(), *args, saved, act, p, seed)\n"
        "    rg = t._grads(t._up(args), act, p, seed, go); sg = t._grads(args, act, p, seed, go.bfloat16())\n"
        "    for n, g, r, s in zip(['dx', 'dw1', 'db1', 'dw2', 'db2'], got, rg, sg):\n"
        "        check_bound(n, g, s, r)\n"
        "assert d.ffn_fwd_calls() == 2 and d.ffn_bwd_calls() == 2, 'fallback did not run'\n"
        "print('ok')\n")
    assert_python_ok(code, timeout=600, FASTATTN_CPU_BF16DOT_FFN="mm")
