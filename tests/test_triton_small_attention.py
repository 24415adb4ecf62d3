"""kernels/attention_small.py (issue 14): one program per (batch, head), forward and one-launch backward.

* Correctness under the Triton interpreter (CPU tensors) through kernels/attention.py's launchers (the
  hook tries the small path first) against the float64 computation of test_triton_attention_kernels.py
  with fastattn.testing's bound: out, lse and dq/dk/dv, every mask kind (causal, key padding, float /
  bool / per-batch masks), GQA, Ev != E, L and S not multiples of the block, L > S and L < S, dropout
  replaying the shared Philox stream, rows that see no key (out 0, lse +inf, zero gradients), both
  K/V load paths (held across the query loop, or re-read per query block), determinism; every case
  asserts that the small path served it (attention_small.CALLS).
* bf16: P and dS are rounded to bf16 before the dV / dK products, as on the GPU (the interpreter widens
  bf16 operands; _operand rounds first).
* Selection: FASTATTN_TRITON_SMALL read once and checked, use_small(False) gives the classic kernels,
  what is not in the table (S > 256, head dims beyond the table, fp64) is declined.
* Compile facts: every TILES entry compiled for sm_80 and sm_90 with triton 3.9 and 3.6 (tests/aot/small.py):
  no stack frame, no spills, shared memory within the chip.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "cuda"
ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from helpers import aot_env, counted  # noqa: E402

T = importlib.import_module("test_triton_attention_kernels")  # its float64 reference and run_and_check
try:
    S = importlib.import_module("fastattn.kernels.attention_small")
except ImportError:
    sys.path.insert(0, str(ROOT))
    S = importlib.import_module("kernels.attention_small")


@pytest.fixture(autouse=True)
def _small_on():
    old = S.ENABLED
    S.use_small(True)
    yield
    S.use_small(old)
    S.INTERPRET_KV_RESIDENT = True
    S._DECISIONS.clear()


def served(fwd=1, bwd=1):
    """Both counters must move: the forward and the backward went through the small kernels."""
    class _Both:
        def __enter__(self):
            self.f, self.b = S.CALLS["fwd"], S.CALLS["bwd"]

        def __exit__(self, *exc):
            if exc[0] is None:
                assert (S.CALLS["fwd"] - self.f, S.CALLS["bwd"] - self.b) == (fwd, bwd), \
                    f"the small path did not serve: {S.CALLS['fwd'] - self.f} fwd, {S.CALLS['bwd'] - self.b} bwd launches"
    return _Both()


MASKS = T.MASKS + [dict(mask_kind="huge_rows", use_kpm=True, causal=True)]
MASK_IDS = T.MASK_IDS + ["huge_rows+kpm+causal"]
SHAPES = [(33, 20), (17, 40), (1, 7), (50, 50)]


# (dtype, allow_tf32, whether the small backward serves it): fp16; tf32 (under the interpreter only,
# which computes its products in fp32, so the fp32 bound holds - on a GPU tf32 would not meet it).
# True fp32 (ieee) is not served (test_selection_and_what_is_declined).
FLAVOURS = [(torch.float16, False, True)] + ([(torch.float32, True, True)] if DEVICE == "cpu" else [])


class _tf32:
    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.on

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.old


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "reload"])
@pytest.mark.parametrize("masks", MASKS, ids=MASK_IDS)
def test_every_mask_fwd_bwd_against_float64(masks, resident):
    S.INTERPRET_KV_RESIDENT = resident
    S._DECISIONS.clear()
    i = MASKS.index(masks)
    l, s = SHAPES[i % len(SHAPES)]
    for dt, tf32, bwd in FLAVOURS:
        with _tf32(tf32), served(1, int(bwd)):
            T.run_and_check(2, 2, 1, l, s, 25, 17, dt, **masks, seed=i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("masks", [dict(), dict(causal=True, use_kpm=True), dict(mask_kind="bool4d")],
                         ids=["none", "causal+kpm", "bool4d"])
@pytest.mark.parametrize("e", [32, 50], ids=["hd32", "hd64"])
def test_half_precision(dtype, masks, e):
    with served():
        T.run_and_check(2, 4, 2, 40, 33, e, e - 7, dtype, **masks)


@pytest.mark.parametrize("masks", [dict(), dict(causal=True, use_kpm=True, mask_kind="float2d")],
                         ids=["plain", "causal+kpm+mask"])
@pytest.mark.parametrize("flavour", FLAVOURS, ids=["fp16", "tf32"][:len(FLAVOURS)])
def test_dropout_replays_the_philox_stream(masks, flavour):
    dt, tf32, bwd = flavour
    with _tf32(tf32), served(1, int(bwd)):
        T.run_and_check(2, 2, 1, 33, 17, 25, 25, dt, dropout_p=0.3, **masks)


def test_dropout_bits_are_exactly_the_shared_stream():
    # v = identity: out[..., j] > 0 exactly where element (i, j) is kept (as the classic test does)
    n, hq, l, s, e, p = 2, 2, 33, 17, 16, 0.4
    q, k, _, _ = T._inputs(n, hq, hq, l, s, e, e, torch.float16)
    v = torch.eye(s, 32).expand(n, hq, s, 32).contiguous().half()
    seed = torch.tensor([(1 << 40) + 987654321], dtype=torch.int64)
    with served(1, 0):
        out, lse = T._fwd(q, k, v, None, None, p, False, 0.1, seed)
    got = out[..., :s] > 0
    want = T.philox.attention_keep_mask(int(seed), p, n, hq, l, s)
    assert torch.equal(got, want), f"dropout mask: {int((got != want).sum())} of {want.numel()} bits differ"


def test_rows_that_see_no_key_give_zero_and_zero_grads():
    n, hq, l, s, e = 2, 2, 17, 33, 25
    q, k, v, do = T._inputs(n, hq, hq, l, s, e, e, torch.float16)
    kpm = torch.zeros(n, s, dtype=torch.bool)
    kpm[1] = True  # batch 1: every key padded
    mask = torch.zeros(n, hq, l, s)
    mask[0, 1, 3] = -math.inf  # one row masked out entirely
    with served():
        out, lse = T._fwd(q, k, v, mask, kpm, 0.0, False, 0.2, None)
        dq, dk, dv = T._bwd(do, q, k, v, out, lse, mask, kpm, 0.0, False, 0.2, None)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("lse", lse)):
        assert not torch.isnan(t).any(), f"{name}: NaN where no key is visible"
    assert torch.all(out[1] == 0) and torch.all(out[0, 1, 3] == 0)
    assert torch.isposinf(lse[1]).all() and torch.isposinf(lse[0, 1, 3])
    assert torch.isfinite(lse[0, 0]).all() and torch.isfinite(lse[0, 1, :3]).all()
    assert torch.all(dq[1] == 0) and torch.all(dq[0, 1, 3] == 0)
    assert torch.all(dk[1] == 0) and torch.all(dv[1] == 0)
    with served():  # the bound, with a bool mask and key padding (rows of batch 1 see no key)
        T.run_and_check(2, 2, 2, 17, 33, 25, 25, torch.float16, mask_kind="bool4d", use_kpm=True)


def test_causal_with_more_queries_than_keys_and_key_zero_padded():
    # top-left causal, L > S: every row sees key 0; with key 0 padded, row 0 sees nothing
    dt = torch.float16
    q, k, v, do = T._inputs(1, 2, 2, 33, 17, 16, 16, dt)
    kpm = torch.zeros(1, 17, dtype=torch.bool)
    kpm[0, 0] = True
    with served():
        out, lse = T._fwd(q, k, v, None, kpm, 0.0, True, 0.25, None)
        dq, dk, dv = T._bwd(do, q, k, v, out, lse, None, kpm, 0.0, True, 0.25, None)
    assert torch.isposinf(lse[0, :, 0]).all() and torch.all(out[0, :, 0] == 0) and torch.all(dq[0, :, 0] == 0)
    out64, lse64, dq64, dk64, dv64 = T._grads64(q, k, v, do, None, kpm, True, 0.25)
    outs, dqs, dks, dvs = T._grads_same_dtype(q, k, v, do, None, kpm, True, 0.25)
    for name, got, ref, same in (("out", out, out64, outs), ("dq", dq, dq64, dqs), ("dk", dk, dk64, dks),
                                 ("dv", dv, dv64, dvs)):
        T._check(name, got, ref, same, dt)


def test_backward_is_deterministic():
    q, k, v, do = T._inputs(2, 4, 2, 33, 65, 25, 25, torch.float16)
    mask = T._mask("float2d", 2, 4, 33, 65, torch.float16)
    kpm = T._kpm(2, 65)
    seed = torch.tensor([42], dtype=torch.int64)
    with served(1, 2):
        out, lse = T._fwd(q, k, v, mask, kpm, 0.2, True, 0.2, seed)
        a = T._bwd(do, q, k, v, out, lse, mask, kpm, 0.2, True, 0.2, seed)
        b = T._bwd(do, q, k, v, out, lse, mask, kpm, 0.2, True, 0.2, seed)
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), f"{name}: two runs differ"


def test_bf16_rounding_of_p_and_ds_is_what_the_gpu_does():
    # One query row, q = dO = c (c = 1 + 2^-7, exact in bf16): each dV / dK element is one product,
    # bf16(bf16(P) * c) when P (dS) is rounded to bf16 before the product, as on the GPU, and
    # bf16(P * c) when not (what the interpreter's widened operands would give).
    e, s, c = 32, 60, 1.0078125
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 1, s, e, generator=g).to(torch.bfloat16) for _ in range(2))
    q = torch.full((1, 1, 1, e), c, dtype=torch.bfloat16)
    do = torch.full((1, 1, 1, e), c, dtype=torch.bfloat16)
    scale = 0.125
    with served():
        out, lse = T._fwd(q, k, v, None, None, 0.0, False, scale, None)
        dq, dk, dv = T._bwd(do, q, k, v, out, lse, None, None, 0.0, False, scale, None)
    sc = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.softmax(sc, -1)
    dp = do.double() @ v.double().transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))

    def bf(t):  # the interpreter's float -> bf16 conversion truncates; the GPU rounds to nearest even
        if DEVICE == "cpu":
            t = (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
        return t.to(torch.bfloat16).double()

    for name, got, val, mult in (("dv", dv, p, c), ("dk", dk, ds, c * scale)):
        got = got.double()[0, 0]
        val = val[0, 0, 0][:, None].expand_as(got)
        rounded_first = (got == bf(bf(val) * mult)).double().mean().item()
        not_rounded = (got == bf(val * mult)).double().mean().item()
        assert rounded_first >= 0.95 and not_rounded <= rounded_first - 0.1, \
            f"{name}: {rounded_first:.2f} match P/dS rounded to bf16 first, {not_rounded:.2f} unrounded"


def test_classifier_shape_slice():
    # the classifier's head dim 25 and L = S = 256 (BLOCK_S 256), two (batch, head) pairs
    with served():
        T.run_and_check(1, 2, 2, 256, 256, 25, 25, torch.float16, use_kpm=True)


def test_selection_and_what_is_declined():
    q = torch.randn(1, 2, 20, 25, dtype=torch.float16)
    assert S.forward(q, q, q, None, None, 0.0, False, 0.2, None) is not None
    S.use_small(False)
    with counted(lambda: S.CALLS["fwd"], 0):
        out, _ = T.A.attention_forward(q, q, q, None, None, 0.0, False, 0.2, None)  # the classic kernels
    assert out.shape == (1, 2, 20, 25)
    S.use_small(True)
    long_k = torch.randn(1, 2, S.MAX_S + 1, 25, dtype=torch.float16)
    assert S.forward(q, long_k, long_k, None, None, 0.0, False, 0.2, None) is None    # S > 256
    wide = torch.randn(1, 2, 20, 200, dtype=torch.float16)
    assert S.forward(wide, wide, wide, None, None, 0.0, False, 0.1, None) is None     # no tile for hd 256
    hd64 = torch.randn(1, 2, 20, 64, dtype=torch.float16)
    k64 = torch.randn(1, 2, 200, 64, dtype=torch.float16)
    assert S.forward(hd64, k64, k64, None, None, 0.0, False, 0.1, None) is not None   # hd 64, S 200: forward
    assert S.backward(hd64, hd64, k64, k64, hd64, None, None, None, 0.0, False, 0.1, None) is None  # not backward
    q32 = q.float()
    with _tf32(False):  # true fp32: its FMA products spill (kernels/attention_small.py), not served
        assert S.forward(q32, q32, q32, None, None, 0.0, False, 0.2, None) is None
    with _tf32(True):
        assert S.forward(q32, q32, q32, None, None, 0.0, False, 0.2, None) is not None
    q64 = q.double()
    assert S.forward(q64, q64, q64, None, None, 0.0, False, 0.2, None) is None       # fp64
    assert S.backward(q64, q64, q64, q64, q64, None, None, None, 0.0, False, 0.2, None) is None
    with pytest.raises(ValueError, match="argument 'on' got 1"):
        S.use_small(1)


@pytest.mark.parametrize("value,ok", [("0", True), ("1", True), ("yes", False)])
def test_environment_variable_is_read_once_and_checked(value, ok):
    code = "import sys; sys.path.insert(0, '.')\nfrom kernels import attention_small as S\nprint(S.ENABLED)\n"
    env = dict(os.environ, FASTATTN_TRITON_SMALL=value, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == str(value == "1")
    else:
        assert proc.returncode != 0 and "'FASTATTN_TRITON_SMALL' got 'yes'" in proc.stderr


# ---- compile facts (no GPU) ---------------------------------------------------------------------------
def _sweep(version):
    env = aot_env(version)
    jobs = os.environ.get("FASTATTN_AOT_JOBS", "1")
    proc = subprocess.run([sys.executable, "-m", "aot.small", "--jobs", jobs], cwd=ROOT / "tests", env=env,
                          capture_output=True, text=True, timeout=3600)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert lines and "triton" in lines[0], f"aot.small produced nothing (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return lines[0], lines[1:]


@pytest.mark.parametrize("version", ["installed", "3.6"])
def test_every_small_tile_compiles_without_spills(version):
    from aot import common

    head, rows = _sweep(version)
    if version == "3.6":
        assert head["triton"] == "3.6.0"
    assert len(rows) == head["jobs"] == len(S.TILES)
    assert {r["arch"] for r in rows} == {80, 90}
    print("\n" + "\n".join(f"{common.describe(r)}: regs {r.get('regs')} stack {r.get('stack')} smem {r.get('smem')}"
                           for r in sorted(rows, key=common.describe)))
    bad = sorted(f"{common.describe(r)}: {'; '.join(common.problems(r))}" for r in rows if common.problems(r))
    assert not bad, f"{len(bad)} small-attention tiles fail with triton {head['triton']}:\n" + "\n".join(bad)
