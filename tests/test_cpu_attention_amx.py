"""The bfloat16 CPU attention forward on AMX (csrc/cpu/attention_amx.cpp), through
torch.ops.fastattn.attention_fwd.

Every case asserts that the AMX path served the call (torch.ops.fastattn_amx.fwd_calls() counts
them), so a silent fall back to the float32-FMA kernels fails here. Ground truth is
fastattn.reference in float64; the bound is the conformance matrix's (fastattn.testing.check_bound):
|out - ref64| <= 2 |bf16 reference - ref64| + floor. Rows that see no key must give out 0, lse +inf.
Skipped, with the reason, only on a CPU (or torch) without AMX bf16.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import fastattn  # noqa: F401  (loads fastattn._C, which registers the ops)
from fastattn.attention import mask_dtype
from fastattn.reference import attention_reference
from fastattn.testing import check_bound
from helpers import attention_inputs, check_dead_rows, counted, expanded_mask, key_padding, kw_id

fwd_op = torch.ops.fastattn.attention_fwd
BF = torch.bfloat16

pytestmark = pytest.mark.skipif(
    not (hasattr(torch.ops, "fastattn_amx") and torch.ops.fastattn_amx.available()),
    reason="this CPU or torch build has no AMX bf16 brgemm (needs amx_bf16 + avx512_bf16)")


def _counted(expected=1):
    return counted(torch.ops.fastattn_amx.fwd_calls, expected, "the AMX path was not taken" if expected else
                   "the AMX path served a call it should have left to the FMA kernels")


def run_case(n=2, hq=2, hkv=2, l=17, s=17, e=64, ev=None, mask=None, kpm=False, causal=False, p=0.0,
             seed=0, expect_amx=True):
    ev = e if ev is None else ev
    q, k, v, gen = attention_inputs(n, hq, hkv, l, s, e, ev, BF, seed)
    m = expanded_mask(mask, n, hq, l, s, mask_dtype(BF), gen)  # float32: the mask dtype of bf16 q
    pad = key_padding(n, s, gen) if kpm else None
    sd = torch.tensor([4321 + seed], dtype=torch.int64) if p > 0 else None
    scale = 1 / math.sqrt(e)
    with _counted(1 if expect_amx else 0):
        out, lse = fwd_op(q, k, v, m, pad, p, causal, scale, sd)
    assert out.shape == (n, hq, l, ev) and out.dtype == BF and lse.shape == (n, hq, l) and lse.dtype == torch.float32
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref, ref_lse = attention_reference(q64, k64, v64, None if m is None else m.double(), pad, p, causal, scale, sd,
                                       return_lse=True)
    same, same_lse = attention_reference(q, k, v, m, pad, p, causal, scale, sd, return_lse=True, upcast=False)
    name = f"amx n{n} hq{hq} hkv{hkv} l{l} s{s} e{e} ev{ev} mask={mask} kpm={kpm} causal={causal} p={p}"
    check_bound(name + " out", out, same, ref)
    live = check_dead_rows(name, out, lse, ref_lse)
    if live.any():
        # lse is float32 from float32 sums: within 2x the bf16 reference's error + 1e-3
        check_bound(name + " lse", lse[live], same_lse[live].float(), ref_lse[live], floor=1e-3)
    return q, k, v, m, pad, sd, scale, out, lse


@pytest.mark.parametrize("e", [1, 25, 64, 80, 128])
@pytest.mark.parametrize("ls", [(1, 1), (17, 17), (257, 600), (600, 257)], ids=lambda x: f"L{x[0]}S{x[1]}")
def test_head_dims_and_lengths(e, ls):
    run_case(l=ls[0], s=ls[1], e=e)


@pytest.mark.parametrize("kw", [
    dict(l=257, s=600, causal=True),
    dict(l=600, s=257, e=25, causal=True),
    dict(l=17, s=257, e=80, causal=True),
    dict(l=100, s=130, mask="float2d"),
    dict(l=100, s=130, mask="bool2d", kpm=True),
    dict(l=70, s=70, e=33, mask="full", causal=True),
    dict(l=70, s=90, mask="col"),
    dict(l=70, s=90, mask="row", e=25),
    dict(l=70, s=90, mask="transposed"),
    dict(l=70, s=90, mask="per_batch", kpm=True),
    dict(l=65, s=300, kpm=True, e=128),
], ids=kw_id)
def test_masks_and_causal(kw):
    run_case(**kw)


@pytest.mark.parametrize("kw", [
    dict(hq=4, hkv=2, l=64, s=80, e=16),
    dict(hq=6, hkv=1, l=33, s=70, e=25, ev=7),
    dict(hq=4, hkv=1, l=257, s=257, e=64, causal=True, kpm=True),
], ids=kw_id)
def test_gqa(kw):
    run_case(**kw)


@pytest.mark.parametrize("kw", [
    dict(l=100, s=100, p=0.3),
    dict(l=257, s=300, e=25, p=0.2, causal=True, kpm=True),
    dict(l=40, s=1300, p=0.1, mask="float2d"),
], ids=kw_id)
def test_dropout(kw):
    run_case(**kw)


@pytest.mark.parametrize("kw", [
    dict(l=40, s=2100, causal=True),  # keys in chunks of 512 with the online rescale
    dict(l=2100, s=40, e=25, causal=True),
    dict(l=33, s=1500, e=80, mask="float2d", kpm=True),
    dict(l=65, s=70, e=256, ev=256),
    dict(l=65, s=70, e=256, ev=3),
], ids=kw_id)
def test_long_keys_and_wide_heads(kw):
    run_case(**kw)


def test_small_key_chunks_rescale(tuning_knob):
    # Force 32-key chunks so that every row goes through the online rescale between chunks.
    tuning_knob("FASTATTN_AMX_KC", 32)
    run_case(l=70, s=300, e=64, causal=True, kpm=True, mask="float2d")
    run_case(l=70, s=300, e=25, p=0.25)


@pytest.mark.parametrize("kw", [
    dict(l=257, s=600, e=64),
    dict(l=100, s=130, e=25, mask="bool2d", kpm=True, causal=True),
    dict(hq=4, hkv=2, l=70, s=90, e=80, p=0.2),
], ids=kw_id)
def test_amx_on_off_agree(tuning_knob, kw):
    q, k, v, m, pad, sd, scale, out, lse = run_case(**kw)
    tuning_knob("FASTATTN_CPU_AMX", 0)
    with counted(torch.ops.fastattn_amx.fwd_calls, 0, "FASTATTN_CPU_AMX=0 must keep the call off the AMX path"):
        out_off, lse_off = fwd_op(q, k, v, m, pad, kw.get("p", 0.0), kw.get("causal", False), scale, sd)
    # both round a float32 result to bf16: at most a few bf16 ulps apart
    diff = (out.float() - out_off.float()).abs()
    tol = 2 ** -7 * out_off.float().abs() + 2e-2
    assert (diff <= tol).all(), f"AMX and FMA kernels differ by {diff.max().item():.3e}"
    fin = torch.isfinite(lse_off)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - lse_off[fin]).abs().max().item() < 1e-3


def test_other_dtypes_do_not_take_amx():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=gen) for _ in range(3))
    with _counted(0):
        fwd_op(q, k, v, None, None, 0.0, False, 0.25, None)
        fwd_op(q.half(), k.half(), v.half(), None, None, 0.0, False, 0.25, None)
