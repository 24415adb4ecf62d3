"""The CPU decoding path (csrc/cpu/attention_decode.cpp): attention_fwd calls with few query rows
(L <= 16) against many keys, keys split into fixed chunks across threads, GQA heads packed.

Every case asserts that the decode path served the call (torch.ops.fastattn_decode.fwd_calls()
counts them). Ground truth is fastattn.reference in float64; the bound is the conformance matrix's
(fastattn.testing.check_bound): |out - ref64| <= 2 |same-dtype reference - ref64| + floor. Rows
that see no key must give out 0 and lse +inf.
"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

import fastattn
from fastattn.attention import mask_dtype
from fastattn import _philox
from fastattn.reference import attention_reference
from fastattn.testing import check_bound
from helpers import attention_inputs, check_dead_rows, counted, expanded_mask, kw_id, run_python

fwd_op = torch.ops.fastattn.attention_fwd

pytestmark = pytest.mark.skipif(not torch.ops.fastattn_decode.enabled(),
                                reason="the decode path is switched off (FASTATTN_CPU_DECODE=0)")


def _counted(expected=1, what="the decode path was not taken"):
    return counted(torch.ops.fastattn_decode.fwd_calls, expected, what)


def make_kpm(kind, n, s, gen):
    if kind is None:
        return None
    pad = torch.zeros(n, s, dtype=torch.bool)
    if kind == "left":  # left padding of a batch of prompts: row b's first b*s/(2n) keys padded
        for b in range(n):
            pad[b, : b * s // (2 * n)] = True
    elif kind == "right":  # right padding: row b's last keys padded
        for b in range(n):
            pad[b, s - b * s // (2 * n):] = True
    elif kind == "middle":  # a padded run in the middle: whole 64-key sub-blocks inside a span skipped
        pad[:, s // 5: s // 2] = True
        pad[0, s // 2 + 3] = True
    elif kind == "random":
        pad = torch.rand(n, s, generator=gen) > 0.7
    elif kind == "dead_batch":  # the last batch row sees no key at all
        pad = torch.rand(n, s, generator=gen) > 0.7
        pad[-1] = True
    else:
        raise ValueError(kind)
    return pad


def run_case(n=2, hq=4, hkv=1, l=1, s=300, e=64, ev=None, mask=None, kpm=None, causal=False, p=0.0,
             dtype=torch.float32, seed=0):
    ev = e if ev is None else ev
    q, k, v, gen = attention_inputs(n, hq, hkv, l, s, e, ev, dtype, seed)
    m = expanded_mask(mask, n, hq, l, s, mask_dtype(dtype), gen)
    pad = make_kpm(kpm, n, s, gen)
    sd = torch.tensor([1234 + seed], dtype=torch.int64) if p > 0 else None
    scale = 1 / math.sqrt(e)
    with _counted():
        out, lse = fwd_op(q, k, v, m, pad, p, causal, scale, sd)
    assert out.shape == (n, hq, l, ev) and out.dtype == dtype and lse.shape == (n, hq, l)
    assert lse.dtype == torch.float32
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), None if m is None else m.double(), pad,
                                       p, causal, scale, sd, return_lse=True)
    same, same_lse = attention_reference(q, k, v, m, pad, p, causal, scale, sd, return_lse=True, upcast=False)
    name = (f"decode n{n} hq{hq} hkv{hkv} l{l} s{s} e{e} ev{ev} mask={mask} kpm={kpm} causal={causal} p={p} "
            f"{dtype}")
    check_bound(name + " out", out, same, ref)
    live = check_dead_rows(name, out, lse, ref_lse)
    if live.any():
        floor = 1e-9 if dtype == torch.float64 else 1e-4
        check_bound(name + " lse", lse[live].double(), same_lse[live].float(), ref_lse[live].double(),
                    floor=max(floor, 1e-6))
    return q, k, v, m, pad, sd, scale, out, lse


@pytest.mark.parametrize("l", [1, 2, 5, 16])
@pytest.mark.parametrize("s", [1, 17, 300, 4096])
def test_lengths(l, s):
    run_case(n=2, hq=8, hkv=2, l=l, s=s, e=64)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("l", [1, 3, 16])
def test_gqa_groups(group, l):
    run_case(n=2, hq=2 * group, hkv=2, l=l, s=1000, e=128)


@pytest.mark.parametrize("e,ev", [(1, 1), (7, 33), (25, 25), (80, 80), (128, 64), (256, 256), (16, 200)])
def test_head_dims(e, ev):
    run_case(n=1, hq=4, hkv=2, l=2, s=150, e=e, ev=ev)


@pytest.mark.parametrize("mask", ["float2d", "bool2d", "bool_nhls", "float_n1ls", "col", "transposed"])
@pytest.mark.parametrize("l", [1, 7])
def test_attn_masks(mask, l):
    run_case(n=2, hq=4, hkv=2, l=l, s=700, e=64, mask=mask)


@pytest.mark.parametrize("kpm", ["left", "right", "middle", "random", "dead_batch"])
def test_key_padding(kpm):
    run_case(n=3, hq=8, hkv=2, l=2, s=2000, e=64, kpm=kpm)


@pytest.mark.parametrize("l,s", [(1, 50), (5, 300), (16, 4096), (16, 16), (3, 2)])
def test_causal_top_left(l, s):
    # top-left: query i sees keys j <= i, so only the first L keys take part
    run_case(n=2, hq=8, hkv=1, l=l, s=s, e=32, causal=True)
    run_case(n=2, hq=4, hkv=4, l=l, s=s, e=32, causal=True, kpm="random", mask="float2d")


@pytest.mark.parametrize("kw", [
    dict(l=1, s=1000, p=0.3),
    dict(l=4, s=300, p=0.1, hq=8, hkv=1, kpm="left", mask="bool2d"),
    dict(l=16, s=40, p=0.5, causal=True),
], ids=kw_id)
def test_dropout_same_mask_as_reference(kw):
    run_case(**kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kw", [
    dict(n=1, hq=8, hkv=2, l=1, s=4096, e=128),
    dict(n=2, hq=4, hkv=4, l=9, s=333, e=25, ev=40, mask="float_n1ls", kpm="right"),
    dict(n=2, hq=8, hkv=1, l=3, s=500, e=64, p=0.2, mask="bool_nhls"),
], ids=kw_id)
def test_dtypes(dtype, kw):
    run_case(dtype=dtype, **kw)


@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_portable_kernels(monkeypatch, isa):
    # FASTATTN_CPU_ISA picks the narrower builds (read per call): the portable code must agree too
    monkeypatch.setenv("FASTATTN_CPU_ISA", isa)
    run_case(n=2, hq=8, hkv=2, l=3, s=1100, e=80, mask="float2d", kpm="random")
    run_case(n=1, hq=4, hkv=1, l=2, s=300, e=64, dtype=torch.bfloat16, causal=True)
    run_case(n=1, hq=4, hkv=1, l=2, s=300, e=64, dtype=torch.float16, p=0.2)


@pytest.mark.parametrize("span", ["64", "128", "1000", "100000"])
def test_spans(monkeypatch, span):
    # FASTATTN_CPU_DECODE_SPAN (per call): a chunk walked in one span or several (each one Q K^T pass,
    # one softmax step, one P V pass), with padded sub-blocks skipped inside a span; the default span
    # is shape-chosen (8192 / rows keys, at most the chunk)
    monkeypatch.setenv("FASTATTN_CPU_DECODE_SPAN", span)
    run_case(n=2, hq=4, hkv=4, l=1, s=2000, e=64, kpm="middle")
    run_case(n=2, hq=4, hkv=2, l=3, s=1500, e=48, kpm="middle", mask="float2d", p=0.2)
    run_case(n=1, hq=8, hkv=1, l=2, s=1100, e=64, dtype=torch.bfloat16, kpm="random", causal=False)
    run_case(n=2, hq=4, hkv=4, l=16, s=900, e=32, dtype=torch.float64, kpm="middle", causal=True)
    monkeypatch.setenv("FASTATTN_CPU_ISA", "default")  # the portable kernels walk spans the same way
    run_case(n=2, hq=4, hkv=2, l=3, s=1500, e=48, kpm="middle", mask="float2d", p=0.2)


def test_small_chunks_combine(monkeypatch):
    # 64-key chunks: many partial results per row, combined across chunks (some wholly padded)
    monkeypatch.setenv("FASTATTN_CPU_DECODE_CHUNK", "64")
    run_case(n=2, hq=4, hkv=2, l=4, s=1000, e=64, kpm="left", mask="float2d")
    run_case(n=2, hq=4, hkv=1, l=1, s=777, e=32, p=0.2, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_bitwise(dtype):
    """Chunks depend on the shape only: 1 and 2 threads give bitwise the same out and lse, whatever the
    split of the tasks among the threads (by cost under key padding) and their order (alternating)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 8, 2, 128, generator=gen).to(dtype)
    k = torch.randn(3, 2, 4096, 128, generator=gen).to(dtype)
    v = torch.randn(3, 2, 4096, 128, generator=gen).to(dtype)
    pad = torch.rand(3, 4096, generator=gen) > 0.8
    pad[1, 200:] = True  # batch row 1 nearly all padding: its tasks cost little, the split moves
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 2, 2):  # three 2-thread calls: both task orders
            torch.set_num_threads(t)
            for kpm in (pad, None):
                with _counted():
                    results.append(fwd_op(q, k, v, None, kpm, 0.0, False, 0.1, None))
    finally:
        torch.set_num_threads(threads)
    for i in range(2, len(results)):
        want = results[i % 2]
        assert torch.equal(results[i][0], want[0]) and torch.equal(results[i][1], want[1]), i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,hq,hkv,l,s,e,rows", [
    (4, 4, 4, 1, 1000, 64, "packed"),    # one row per task: the two-accumulator P V, E a compile-time 64
    (2, 8, 2, 2, 777, 80, "heads_inner"),  # K/V rows hkv*e apart (per-row prefetch), E = 80
    (1, 2, 2, 1, 300, 25, "packed"),     # E not a multiple of 16 (run-time head dim), a 12-key tail
])
def test_prefetch_and_order_bitwise(monkeypatch, dtype, n, hq, hkv, l, s, e, rows):
    """The prefetch distance, locality and step and the task order (FASTATTN_CPU_DECODE_PREFETCH,
    _PF_HINT, _PF_STEP, _ORDER, read per call) move no number: every setting gives bitwise the default
    call's out and lse, which meets the reference bound."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(n, hq, l, e, generator=gen).to(dtype)
    if rows == "packed":
        k = torch.randn(n, hkv, s, e, generator=gen).to(dtype)
        v = torch.randn(n, hkv, s, e, generator=gen).to(dtype)
    else:  # (N, S, Hkv, E) storage viewed as (N, Hkv, S, E)
        k = torch.randn(n, s, hkv, e, generator=gen).to(dtype).transpose(1, 2)
        v = torch.randn(n, s, hkv, e, generator=gen).to(dtype).transpose(1, 2)
    pad = torch.rand(n, s, generator=gen) > 0.9
    scale = 1 / math.sqrt(e)
    for name in ("FASTATTN_CPU_DECODE_PREFETCH", "FASTATTN_CPU_DECODE_PF_HINT", "FASTATTN_CPU_DECODE_PF_STEP",
                 "FASTATTN_CPU_DECODE_ORDER"):
        monkeypatch.delenv(name, raising=False)

    def call():
        with _counted():
            return fwd_op(q, k, v, None, pad, 0.0, False, scale, None)

    want, want_lse = call()
    ref = attention_reference(q.double(), k.double(), v.double(), None, pad, 0.0, False, scale, None)
    same = attention_reference(q, k, v, None, pad, 0.0, False, scale, None, upcast=False)
    check_bound(f"decode prefetch/order {dtype} n{n} hq{hq} hkv{hkv} l{l} s{s} e{e} {rows}", want, same, ref)
    settings = [dict(PREFETCH="0"), dict(PREFETCH="64", PF_HINT="3", PF_STEP="64"),
                dict(PREFETCH="4096", PF_HINT="0", PF_STEP="200"), dict(PREFETCH="100000", PF_HINT="2"),
                dict(PREFETCH="1", PF_HINT="1", PF_STEP="1"), dict(ORDER="1"), dict(ORDER="0")]
    for setting in settings:
        for key, val in setting.items():
            monkeypatch.setenv("FASTATTN_CPU_DECODE_" + key, val)
        for _ in range(2):  # ORDER=1 alternates between calls: both orders
            out, lse = call()
            assert torch.equal(out, want) and torch.equal(lse, want_lse), setting
        for key in setting:
            monkeypatch.delenv("FASTATTN_CPU_DECODE_" + key)


def test_longer_queries_not_served():
    q = torch.randn(1, 2, 17, 32)
    k = torch.randn(1, 2, 100, 32)
    with _counted(0, "L = 17 must go to the tiled kernels"):
        fwd_op(q, k, k, None, None, 0.0, False, 0.2, None)


def test_off_switch():
    code = ("import torch, fastattn; q = torch.randn(1, 2, 1, 32); k = torch.randn(1, 2, 100, 32); "
            "torch.ops.fastattn.attention_fwd(q, k, k, None, None, 0.0, False, 0.2, None); "
            "print(torch.ops.fastattn_decode.enabled(), torch.ops.fastattn_decode.fwd_calls())")
    res = run_python(code, FASTATTN_CPU_DECODE="0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "0"], res.stdout


@pytest.mark.parametrize("kw", [
    dict(hq=8, hkv=2, l=1, s=600, causal=False, kpm=True),
    dict(hq=4, hkv=4, l=5, s=300, causal=True, kpm=False, p=0.2),
], ids=kw_id)
def test_backward_through_decode_forward(kw):
    """The backward reads the lse the decode forward wrote: gradients within the bound too."""
    hq, hkv, l, s, causal, p = kw["hq"], kw["hkv"], kw["l"], kw["s"], kw["causal"], kw.get("p", 0.0)
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, h, n, 64, generator=gen) for h, n in ((hq, l), (hkv, s), (hkv, s)))
    pad = (torch.rand(2, s, generator=gen) > 0.7) if kw["kpm"] else None
    dout = torch.randn(2, hq, l, 64, generator=gen)
    qb, kb, vb = (t.clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(3)
    with _counted():
        out = fastattn.scaled_dot_product_attention(qb, kb, vb, dropout_p=p, is_causal=causal, key_padding_mask=pad,
                                                    enable_gqa=hq != hkv, backend="cpu")
    grads = torch.autograd.grad(out, (qb, kb, vb), dout)
    torch.manual_seed(3)
    sd = _philox.new_seed() if p > 0 else None
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, None, pad, p, causal, None, sd)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    same = attention_reference(qs, ks, vs, None, pad, p, causal, None, sd, upcast=False)
    same_grads = torch.autograd.grad(same, (qs, ks, vs), dout)
    check_bound("decode out", out, same, ref)
    for name, g_, r_, s_ in zip(("dq", "dk", "dv"), grads, ref_grads, same_grads):
        check_bound(f"decode {name}", g_, s_, r_)


@pytest.mark.parametrize("l,s,hq,hkv,chunk", [(1, 300, 4, 4, None), (16, 16, 4, 4, None), (5, 700, 8, 2, "64"),
                                              (40, 90, 4, 4, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_rows_in_place(monkeypatch, l, s, hq, hkv, chunk, dtype):
    """The CPU op reads q, k, v viewed as heads in a packed projection's rows, (N, L, 3, H, hd), and
    views of a longer KV cache (N, S_max, H, hd)[:, :S]: the decode path (L <= 16) in place, the tiled
    kernels (L = 40) from copies; bitwise the contiguous call's out and lse, out laid out (N, L, H, Ev)
    for a non-contiguous q (as the fake kernel says: opcheck), and the backward's gradients alike."""
    if chunk is not None:  # several chunks per row: the combine writes the strided out too
        monkeypatch.setenv("FASTATTN_CPU_DECODE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(21)
    n, hd = 2, 24
    packed = torch.randn(n, l, 3, hq, hd, generator=gen).to(dtype)
    q = packed[:, :, 0].transpose(1, 2)  # (N, Hq, L, hd), rows 3*Hq*hd apart
    cache = torch.randn(2, n, s + 7, hkv, hd, generator=gen).to(dtype)
    k, v = (cache[i, :, :s].transpose(1, 2) for i in range(2))  # (N, Hkv, S, hd) views of a longer cache
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    pad = torch.rand(n, s, generator=gen) > 0.8
    with _counted(1 if l <= 16 else 0, "L <= 16 goes to the decode path, longer to the tiled kernels"):
        out, lse = fwd_op(q, k, v, None, pad, 0.0, l < s, 0.3, None)
    want, want_lse = fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), None, pad, 0.0, l < s, 0.3, None)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    assert out.transpose(1, 2).is_contiguous() and lse.is_contiguous()
    torch.library.opcheck(fwd_op.default, (q, k, v, None, pad, 0.0, l < s, 0.3, None),
                          test_utils=("test_schema", "test_faketensor"))
    go = torch.randn(n, hq, l, hd, generator=gen).to(dtype)
    grads = torch.ops.fastattn.attention_bwd(go, q, k, v, out, lse, None, pad, 0.0, l < s, 0.3, None)
    want_grads = torch.ops.fastattn.attention_bwd(go, q.contiguous(), k.contiguous(), v.contiguous(), want, want_lse,
                                                  None, pad, 0.0, l < s, 0.3, None)
    for g, w in zip(grads, want_grads):
        assert g.is_contiguous() and torch.equal(g, w)


_BF16DOT = torch.ops.fastattn_bf16dot.available()


@pytest.mark.skipif(not _BF16DOT, reason="no AVX512_BF16 on this CPU (or FASTATTN_CPU_BF16DOT=0): bf16 K/V "
                                         "are converted to float32 instead")
@pytest.mark.parametrize("kw", [
    dict(n=1, hq=8, hkv=2, l=1, s=4096, e=128),                     # GQA 4, E a multiple of 32
    dict(n=2, hq=4, hkv=4, l=16, s=777, e=64),                      # 16 rows, odd key count
    dict(n=2, hq=4, hkv=2, l=3, s=333, e=25, ev=40, mask="float_n1ls", kpm="right"),  # masked tails
    dict(n=2, hq=4, hkv=4, l=2, s=1500, e=48, kpm="middle", p=0.2),  # skipped sub-blocks, dropout
    dict(n=1, hq=2, hkv=2, l=5, s=77, e=200, causal=True),          # head dim > 128: the one-key loop
    dict(n=2, hq=8, hkv=1, l=1, s=1000, e=96, mask="bool_nhls"),
], ids=kw_id)
def test_bf16_dot_products(kw):
    """bf16 K/V on vdpbf16ps (csrc/cpu/attention_decode_kernel.h, FA_DEC_BF16DOT): K and V read in place,
    Q K^T from the bf16 q rows, P rounded to bf16 against key-paired V rows; the counter proves the path
    served each call, the bound is the conformance matrix's."""
    calls = torch.ops.fastattn_decode.bf16dot_calls
    with counted(calls, 1, "the bf16 decode call did not run on vdpbf16ps"):
        run_case(dtype=torch.bfloat16, **kw)
    for dtype in (torch.float32, torch.float16):  # other dtypes keep their kernels
        with counted(calls, 0, f"{dtype} must not take the bf16 dot-product kernels"):
            run_case(dtype=dtype, n=1, hq=4, hkv=2, l=1, s=300, e=64)


def test_bf16_dot_products_off_switch():
    """FASTATTN_CPU_BF16DOT=0: bf16 K/V are converted to float32 (the path any CPU runs), still correct."""
    code = ("import torch, fastattn, math; from fastattn.reference import attention_reference as ref; "
            "g = torch.Generator().manual_seed(0); "
            "q, k, v = (torch.randn(1, 4, l, 64, generator=g).bfloat16() for l in (2, 900, 900)); "
            "out, lse = torch.ops.fastattn.attention_fwd(q, k, v, None, None, 0.0, False, 0.125, None); "
            "want = ref(q.double(), k.double(), v.double(), None, None, 0.0, False, 0.125, None); "
            "err = (out.double() - want).abs().max().item(); "
            "print(torch.ops.fastattn_decode.fwd_calls(), torch.ops.fastattn_decode.bf16dot_calls(), err < 4e-3)")
    res = run_python(code, FASTATTN_CPU_BF16DOT="0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["1", "0", "True"], res.stdout
