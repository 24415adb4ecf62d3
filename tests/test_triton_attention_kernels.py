"""The Triton attention kernels' own tests, under the Triton interpreter on CPU tensors.

kernels/attention.py's launchers are called directly with the normalised inputs of the backend
contract (fastattn/backends/README.md) and compared with a float64 computation written here:
forward, lse and every gradient, every mask kind, GQA, dropout (the Philox bits must match
fastattn._philox exactly), head dims 1/25/64/80/128, L != S, rows that see no key, determinism.
Bound, as the conformance matrix: max|kernel - ref64| <= 2 * max|torch same dtype - ref64| + floor.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import pathlib
import sys

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import attention_inputs  # noqa: E402

# Without a GPU the kernels run under the interpreter on CPU tensors (set before triton kernels are
# imported, as tests/conftest.py does); with one, the same cases run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_kernels():
    try:
        return importlib.import_module("fastattn.kernels.attention")
    except ImportError:  # a checkout that was never installed: import kernels/ from the repo root
        sys.path.insert(0, str(ROOT))
        return importlib.import_module("kernels.attention")


def _load(name):
    # fastattn/_philox.py and fastattn/testing.py import torch only; loading them by path keeps these
    # tests independent of the rest of the package (and of the C++ build).
    spec = importlib.util.spec_from_file_location(f"_fastattn_{name}", ROOT / "fastattn" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


A = _load_kernels()


@pytest.fixture(autouse=True)
def _classic_kernels_only():
    """These are the classic kernels' tests: the small path (kernels/attention_small.py, which
    attention_forward/backward try first; tested in test_triton_small_attention.py) stays off here."""
    small = importlib.import_module(A.__name__.rsplit(".", 1)[0] + ".attention_small")
    old = small.ENABLED
    small.use_small(False)
    yield
    small.use_small(old)
philox = _load("_philox")
testing = _load("testing")


def _dev(t):
    """t on DEVICE; a stride-0 (expanded) view stays a view: its base moves, then expands again."""
    if t is None or DEVICE == "cpu":
        return t
    idx = tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())
    return t[idx].to(DEVICE).expand(t.shape)


def _fwd(q, k, v, mask, kpm, p, causal, scale, seed):
    out, lse = A.attention_forward(_dev(q), _dev(k), _dev(v), _dev(mask), _dev(kpm), p, causal, scale, seed)
    return out.cpu(), lse.cpu()


def _bwd(do, q, k, v, out, lse, mask, kpm, p, causal, scale, seed):
    grads = A.attention_backward(*(_dev(t) for t in (do, q, k, v, out, lse, mask, kpm)), p, causal, scale, seed)
    return tuple(g.cpu() for g in grads)



# ---- float64 (or same-dtype) math ---------------------------------------------------------------
def reference(q, k, v, mask, kpm, causal, scale, dropout_p=0.0, keep=None, dtype=torch.float64):
    """Attention by plain math in `dtype`; returns (out, lse). A row that sees no key gives 0 and lse +inf."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, 1)
    v = v.repeat_interleave(group, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(dtype)
    l, sl = s.shape[-2:]
    if causal:
        s = s.masked_fill(torch.ones(l, sl, dtype=torch.bool).triu(1), -math.inf)
    if kpm is not None:
        s = s.masked_fill(kpm[:, None, None, :], -math.inf)
    dead = torch.isneginf(s).all(-1, keepdim=True)
    s = torch.where(dead, torch.zeros((), dtype=dtype), s)
    p = torch.softmax(s, -1) * (~dead)
    lse = torch.where(dead[..., 0], torch.full((), math.inf, dtype=dtype), torch.logsumexp(s, -1))
    if dropout_p > 0:
        p = p * keep / (1.0 - dropout_p)
    return p @ v, lse


def _inputs(n, hq, hkv, l, s, e, ev, dtype, seed=0):
    q, k, v, g = attention_inputs(n, hq, hkv, l, s, e, ev, dtype, seed)
    do = torch.randn(n, hq, l, ev, generator=g).to(dtype)
    return q, k, v, do


def _mask(kind, n, hq, l, s, dtype, seed=1):
    """The additive (N, Hq, L, S) view the API hands the kernels, for a user mask of `kind`."""
    g = torch.Generator().manual_seed(seed)
    if kind == "float2d":  # (L, S) float -> strides (0, 0, S, 1)
        return torch.randn(l, s, generator=g).to(dtype).expand(n, hq, l, s)
    if kind == "bool4d":  # (N, Hq, L, S) bool, keep = True -> 0 / -inf
        keep = torch.rand(n, hq, l, s, generator=g) > 0.3
        keep[..., 0] = True
        return torch.zeros(n, hq, l, s, dtype=dtype).masked_fill(~keep, -math.inf)
    if kind == "float_n1":  # (N, 1, L, S) float -> head stride 0
        return torch.randn(n, 1, l, s, generator=g).to(dtype).expand(n, hq, l, s)
    if kind == "huge_rows":  # (L, S) float, every third row offset by -2^40 (its |lse| >= 32), float32
        offset = torch.where(torch.arange(l)[:, None] % 3 == 1, -2.0 ** 40, 0.0)
        return (torch.randn(l, s, generator=g) + offset).float().expand(n, hq, l, s)
    assert kind is None
    return None


def _kpm(n, s, seed=2):
    """bool (N, S), True = padded: random holes, right padding, and (last batch) left padding;
    key s // 2 is kept in every batch so every row sees a key."""
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(n, s, generator=g) < 0.35
    kpm[:, -1] = True
    kpm[-1, : s // 2] = True
    kpm[:, s // 2] = False
    return kpm


def _grads64(q, k, v, do, mask, kpm, causal, scale, dropout_p=0.0, keep=None):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, lse = reference(q64, k64, v64, mask, kpm, causal, scale, dropout_p, keep)
    out.backward(do.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def _grads_same_dtype(q, k, v, do, mask, kpm, causal, scale, dropout_p=0.0, keep=None):
    dt = q.dtype
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, _ = reference(qs, ks, vs, mask, kpm, causal, scale, dropout_p, keep, dtype=dt)
    out.backward(do)
    return out.detach(), qs.grad, ks.grad, vs.grad


def _check(name, got, ref64, same, dtype):
    """max|got - ref64| <= 2 * max|same - ref64| + floor(dtype) (fastattn.testing)."""
    assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
    testing.check_bound(name, got, same, ref64)


def run_and_check(n, hq, hkv, l, s, e, ev, dtype=torch.float32, mask_kind=None, use_kpm=False, causal=False,
                  dropout_p=0.0, seed=0, scale=None):
    q, k, v, do = _inputs(n, hq, hkv, l, s, e, ev, dtype, seed)
    mask = _mask(mask_kind, n, hq, l, s, dtype)
    kpm = _kpm(n, s) if use_kpm else None
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    seed_t = torch.tensor([123456789012 + seed], dtype=torch.int64) if dropout_p > 0 else None
    keep = (philox.attention_keep_mask(int(seed_t), dropout_p, n, hq, l, s) if dropout_p > 0 else None)

    out, lse = _fwd(q, k, v, mask, kpm, dropout_p, causal, scale, seed_t)
    dq, dk, dv = _bwd(do, q, k, v, out, lse, mask, kpm, dropout_p, causal, scale, seed_t)

    out64, lse64, dq64, dk64, dv64 = _grads64(q, k, v, do, mask, kpm, causal, scale, dropout_p, keep)
    outs, dqs, dks, dvs = _grads_same_dtype(q, k, v, do, mask, kpm, causal, scale, dropout_p, keep)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    _check("out", out, out64, outs, dtype)
    # lse: +inf exactly where the reference sees no key, and close elsewhere.
    dead = torch.isinf(lse64)
    assert torch.equal(torch.isposinf(lse), dead), "lse: +inf rows differ from the rows that see no key"
    if (~dead).any():
        lse_err = (lse.double() - lse64)[~dead].abs().max().item()
        assert lse_err <= 1e-4 * (1 + lse64[~dead].abs().max().item()) * (1 if dtype == torch.float32 else 30), \
            f"lse: max error {lse_err:.3g}"
    _check("dq", dq, dq64, dqs, dtype)
    _check("dk", dk, dk64, dks, dtype)
    _check("dv", dv, dv64, dvs, dtype)
    return out, lse, (dq, dk, dv), dead


# ---- the cases ----------------------------------------------------------------------------------
SHAPES = [(1, 17), (17, 33), (33, 65), (65, 17), (17, 1)]
MASKS = [
    dict(),
    dict(causal=True),
    dict(use_kpm=True),
    dict(mask_kind="float2d"),
    dict(mask_kind="bool4d"),
    dict(mask_kind="float_n1", use_kpm=True, causal=True),
]
MASK_IDS = ["none", "causal", "kpm", "float2d", "bool4d", "n1+kpm+causal"]


@pytest.mark.parametrize("e", [1, 25, 64, 80, 128])
@pytest.mark.parametrize("masks", MASKS, ids=MASK_IDS)
def test_fp32_every_mask_and_head_dim(e, masks):
    i = [1, 25, 64, 80, 128].index(e) + MASKS.index(masks)
    l, s = SHAPES[i % len(SHAPES)]
    run_and_check(2, 2, 2, l, s, e, e, torch.float32, **masks, seed=i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("masks", [dict(), dict(causal=True, use_kpm=True), dict(mask_kind="bool4d")],
                         ids=["none", "causal+kpm", "bool4d"])
@pytest.mark.parametrize("e", [25, 64])
def test_half_precision(dtype, masks, e):
    run_and_check(2, 2, 1, 33, 17, e, e, dtype, **masks)


@pytest.mark.parametrize("l,s", [(17, 33), (65, 17), (1, 65)])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_and_value_dim(l, s, causal):
    # Hq = 2 query heads share Hkv = 1 kv head; Ev != E.
    run_and_check(2, 2, 1, l, s, 25, 17, torch.float32, causal=causal, use_kpm=True)


def test_gqa_four_heads_two_groups():
    run_and_check(1, 4, 2, 33, 33, 16, 16, torch.float32, mask_kind="float_n1", causal=True)


@pytest.mark.parametrize("masks", [dict(), dict(causal=True, use_kpm=True, mask_kind="float2d")],
                         ids=["plain", "causal+kpm+mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_dropout_matches_philox_reference(masks, dtype):
    run_and_check(2, 2, 1, 33, 17, 25, 25, dtype, dropout_p=0.3, **masks)


@pytest.mark.parametrize("masks", MASKS + [dict(mask_kind="huge_rows", use_kpm=True, causal=True)],
                         ids=MASK_IDS + ["huge_rows+kpm+causal"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop"])
def test_large_logits_split_log_sum_exp(masks, dropout_p):
    """Scale 6: |lse| >= 32 on (nearly) every row, so the delta pre-pass recomputes each row's max and
    sum (base + rest) and delta = rowsum(P dP) (huge_rows: only every third row, the others in the
    same blocks keep lse): GQA, Ev != E, every mask kind, dropout, within the conformance bound."""
    i = MASKS.index(masks) if masks in MASKS else 3
    l, s = SHAPES[i % len(SHAPES)]
    run_and_check(2, 2, 1, max(l, 5), max(s, 5), 24, 16, torch.float32, **masks, dropout_p=dropout_p, seed=i,
                  scale=6.0)


@pytest.mark.parametrize("l,s", [(33, 17), (17, 16)])
def test_dropout_bits_are_exactly_the_shared_stream(l, s):
    # With v = identity (Ev >= S), out[b, h, i, j] = P[i, j] * keep[i, j] / (1 - p): every kept
    # element is > 0 and every dropped one is exactly 0, so the kernel's mask is read off directly.
    n, hq, e, p = 2, 2, 16, 0.4
    q, k, _, _ = _inputs(n, hq, hq, l, s, e, e, torch.float32)
    v = torch.eye(s, 32).expand(n, hq, s, 32).contiguous()
    seed = torch.tensor([(1 << 40) + 987654321], dtype=torch.int64)
    out, lse = _fwd(q, k, v, None, None, p, False, 0.1, seed)
    got = out[..., :s] > 0
    want = philox.attention_keep_mask(int(seed), p, n, hq, l, s)
    assert torch.equal(got, want), f"dropout mask: {int((got != want).sum())} of {want.numel()} bits differ"
    dropped = 1 - want.float().mean().item()
    assert abs(dropped - p) < 0.06, f"dropped fraction {dropped:.3f}, expected about {p}"
    # The backward regenerates the same bits: dv = (P * keep / (1-p))^T dO, checked with the exact mask.
    do = torch.randn(n, hq, l, 32)
    dq, dk, dv = _bwd(do, q, k, v, out, lse, None, None, p, False, 0.1, seed)
    _, _, _, _, dv64 = _grads64(q, k, v, do, None, None, False, 0.1, p, want)
    assert (dv.double() - dv64).abs().max().item() < 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_head_dim_256_mask_dropout_with_and_without_key_padding(causal):
    # key padding is a runtime flag of every kernel: the same compiled kernel serves both calls
    run_and_check(1, 2, 1, 17, 20, 200, 256, torch.float16, mask_kind="float2d", causal=causal, dropout_p=0.25)
    run_and_check(1, 2, 1, 17, 20, 200, 256, torch.float16, mask_kind="float2d", use_kpm=True, causal=causal,
                  dropout_p=0.25)


def test_rows_that_see_no_key_give_zero_and_zero_grads():
    n, hq, l, s, e = 2, 2, 17, 33, 25
    q, k, v, do = _inputs(n, hq, hq, l, s, e, e, torch.float32)
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key padded
    mask = torch.zeros(n, hq, l, s)
    mask[0, 1, 3] = -math.inf  # one row of batch 0 / head 1 masked out entirely
    out, lse = _fwd(q, k, v, mask, kpm, 0.0, False, 0.2, None)
    dq, dk, dv = _bwd(do, q, k, v, out, lse, mask, kpm, 0.0, False, 0.2, None)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("lse", lse)):
        assert not torch.isnan(t).any(), f"{name}: NaN where no key is visible"
    assert torch.all(out[1] == 0) and torch.all(out[0, 1, 3] == 0), "out: rows with no visible key must be 0"
    assert torch.isposinf(lse[1]).all() and torch.isposinf(lse[0, 1, 3]), "lse: must be +inf for those rows"
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(lse[0, 1, :3]).all()
    assert torch.all(dq[1] == 0) and torch.all(dq[0, 1, 3] == 0), "dq: rows with no visible key must get 0"
    assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0), "dk/dv: padded keys must get 0"
    run_and_check(2, 2, 2, 17, 33, 25, 25, torch.float32, mask_kind="bool4d", use_kpm=True)


def test_causal_with_more_queries_than_keys_and_fully_masked_rows():
    # top-left causal, L > S: every row sees key 0; with key 0 padded, row 0 sees nothing.
    n, hq, l, s, e = 1, 2, 33, 17, 16
    q, k, v, do = _inputs(n, hq, hq, l, s, e, e, torch.float32)
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[0, 0] = True
    out, lse = _fwd(q, k, v, None, kpm, 0.0, True, 0.25, None)
    assert torch.isposinf(lse[0, :, 0]).all() and torch.all(out[0, :, 0] == 0)
    out64, lse64, dq64, dk64, dv64 = _grads64(q, k, v, do, None, kpm, True, 0.25)
    dq, dk, dv = _bwd(do, q, k, v, out, lse, None, kpm, 0.0, True, 0.25, None)
    for name, got, want in (("out", out, out64), ("dq", dq, dq64), ("dk", dk, dk64), ("dv", dv, dv64)):
        err = (got.double() - want).abs().max().item()
        assert err < 2e-5, f"{name}: max error {err:.3g}"


def test_backward_is_deterministic():
    n, hq, hkv, l, s, e = 2, 2, 1, 33, 65, 25
    q, k, v, do = _inputs(n, hq, hkv, l, s, e, e, torch.float32)
    mask = _mask("float2d", n, hq, l, s, torch.float32)
    kpm = _kpm(n, s)
    seed = torch.tensor([42], dtype=torch.int64)
    out, lse = _fwd(q, k, v, mask, kpm, 0.2, True, 0.2, seed)
    first = _bwd(do, q, k, v, out, lse, mask, kpm, 0.2, True, 0.2, seed)
    second = _bwd(do, q, k, v, out, lse, mask, kpm, 0.2, True, 0.2, seed)
    for name, a, b in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name}: two backward runs differ (max {(a - b).abs().max().item():.3g})"


def test_seed_changes_the_mask_and_reproduces():
    q, k, v, _ = _inputs(1, 1, 1, 17, 17, 16, 16, torch.float32)
    s1 = torch.tensor([1], dtype=torch.int64)
    s2 = torch.tensor([2], dtype=torch.int64)
    a, _ = _fwd(q, k, v, None, None, 0.5, False, 0.25, s1)
    b, _ = _fwd(q, k, v, None, None, 0.5, False, 0.25, s1)
    c, _ = _fwd(q, k, v, None, None, 0.5, False, 0.25, s2)
    assert torch.equal(a, b), "same seed must give the same output"
    assert not torch.equal(a, c), "a different seed must give a different mask"


def test_config_tables_cover_every_key():
    # Every key a launch can form has a tile on both arch families, and the AOT enumeration lists it.
    C = A.configs
    for arch in C.ARCH_FAMILIES:
        cases = A.compile_cases(arch)
        for name in C.ATTN_KERNELS:
            for dc in C.DTYPE_CLASSES:
                for hd in C.HEAD_DIM_BUCKETS:
                    for sq in C.SEQ_BUCKETS:
                        for var in C.VARIANTS:
                            tile = C.ATTENTION[name, dc, hd, sq, var, arch]
                            assert (name, dc, hd, var, tile) in cases, f"{name} {dc} {hd} {sq} {var}: not compiled"
    assert A.head_dim_bucket(1) == 32 and A.head_dim_bucket(33) == 64 and A.head_dim_bucket(256) == 256
