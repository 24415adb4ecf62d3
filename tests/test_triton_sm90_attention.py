"""kernels/attention_sm90.py and attention_sm90_bwd.py: the sm_90 forward and backward, their
selection, and what they compile to.

* Correctness under the Triton interpreter (CPU tensors) against a float64 computation with
  fastattn.testing's bound, for both load paths of the one kernel: TMA tensor descriptors
  (tl.make_tensor_descriptor runs under the interpreter of triton 3.9) and plain loads, head dims
  32/64/128/256, causal or not, GQA, L != S, L > S, L < S, partial blocks.
* Selection: FASTATTN_TRITON_ATTN=sm90|classic read once, bad values named; the calls the kernel
  does not serve (masks, padding, dropout, fp32, Ev != E, E not a bucket, S == 0) return None (the
  classic kernels run).
* Backward under the interpreter against the float64 gradients with the same bound (the helpers of
  tests/test_triton_attention_kernels.py): causal, key padding, float/bool masks, dropout (the shared
  Philox stream), GQA, Ev != E, odd L and S, both load paths; bitwise determinism; and the bf16
  rounding of P and dS, which the interpreter's widened bf16 would hide: the kernel's dV and dK
  match a float64 run that rounds P and dS to bf16 explicitly far better than one that does not.
* Compile facts for sm_90 (no GPU needed): every config the selection can choose (forward and
  backward: head-dim bucket (x variant) x load path (TMA / plain)) in fp16, and one case per bucket
  and load path in bf16 (whose facts must equal the fp16 ones: the dtype changes only the
  instructions' type), compiled with triton.compile(ASTSource, GPUTarget("cuda", 90, 32)) by
  tests/aot/sm90.py under this triton (3.9) and under triton 3.6 from a --target folder
  (FASTATTN_TRITON36, default .triton36, which make test installs; skipped with the reason when
  absent), the two sweeps running side by side: no spills, shared memory <= 227 KB,
  wgmma.mma_async in the PTX and no mma.sync, TMA loads (cp.async.bulk.tensor) exactly where
  descriptors are used, and in the backward every wgmma product (from the TTGIR) has whole
  warpgroups of 64 distinct rows, the BLOCK_N x hd dK/dV accumulators among them; hd 64 and hd 128
  (plain) have such a tile.
"""
from __future__ import annotations

import importlib.util
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

from fastattn.testing import check_bound  # noqa: E402

SMEM_LIMIT_SM90 = 227 * 1024


def _kernel_module(name: str):
    """fastattn.kernels.<name> (kernels/ from the checkout when fastattn is not installed)."""
    try:
        return importlib.import_module(f"fastattn.kernels.{name}")
    except ImportError:
        sys.path.insert(0, str(ROOT))
        return importlib.import_module(f"kernels.{name}")


def _sm90():
    return _kernel_module("attention_sm90")


@pytest.fixture(autouse=True)
def _small_path_off():
    """The sm_90 kernels' tests: the forward that gives their out and lse (and the hook tests) run the
    classic and sm_90 kernels; kernels/attention_small.py, tried first for short sequences, stays off
    (it has its own tests in test_triton_small_attention.py)."""
    small = _kernel_module("attention_small")
    old = small.ENABLED
    small.use_small(False)
    yield
    small.use_small(old)


def _reference(q, k, v, causal, scale, dtype):
    """(out, lse) computed in `dtype` (torch's own rounding: float64 gives the reference)."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(g, 1), v.to(dtype).repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)).float() * scale if dtype != torch.float64 else (q @ k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).to(dtype)
    return p @ v, lse


CASES = [  # (N, Hq, Hkv, L, S, E, causal)
    (1, 2, 1, 37, 29, 64, False),   # GQA, L != S, partial blocks, E == bucket
    (1, 2, 1, 37, 29, 64, True),    # causal with L > S
    (2, 1, 1, 20, 45, 32, True),    # causal with L < S
    (1, 2, 2, 33, 33, 256, False),
    (1, 1, 1, 18, 40, 128, True),
]


@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "plain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n%d_hq%d_hkv%d_l%d_s%d_e%d_%s" % (*c[:6], "causal" if c[6] else "full"))
def test_forward_matches_float64_reference(case, dtype, use_tma):
    S = _sm90()
    n, hq, hkv, l, s, e, causal = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    q, k, v = (torch.randn(n, h, m, e, generator=gen).to(dtype) for h, m in ((hq, l), (hkv, s), (hkv, s)))
    scale = 1.0 / math.sqrt(e)
    res = S.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, None, 0.0, causal, scale, None,
                    force=True, use_tma=use_tma)
    assert res is not None, "the sm_90 kernel declined a case it serves"
    out, lse = res
    ref_out, ref_lse = _reference(q, k, v, causal, scale, torch.float64)
    torch_out, torch_lse = _reference(q, k, v, causal, scale, dtype)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == (n, hq, l, e)
    check_bound("out", out, torch_out, ref_out)
    check_bound("lse", lse, torch_lse, ref_lse, floor=1e-4)


def test_the_hook_in_attention_forward_uses_the_mode():
    # Off sm_90 (here: CPU tensors) the classic kernels run whatever the mode; forward() says so.
    S = _sm90()
    q = torch.randn(1, 1, 8, 32, dtype=torch.float16)
    assert S.forward(q, q, q, None, None, 0.0, False, 0.1, None) is None
    old = S.MODE
    try:
        S.use_mode("classic")
        assert not S.serves(q.cuda() if torch.cuda.is_available() else q, q, q, None, None, 0.0, 0.1)
    finally:
        S.use_mode(old)
    with pytest.raises(ValueError, match="argument 'mode' got 'fast'"):
        S.use_mode("fast")


def test_declines_what_it_does_not_serve():
    S = _sm90()
    q16 = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    v48 = torch.randn(1, 1, 8, 48, dtype=torch.float16)
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.float16)
    kpm = torch.zeros(1, 8, dtype=torch.bool)
    assert S.serves(q16, q16, q16, None, None, 0.0, 0.125, force=True)
    assert not S.serves(q16, q16, q16, mask, None, 0.0, 0.125, force=True)
    assert not S.serves(q16, q16, q16, None, kpm, 0.0, 0.125, force=True)
    assert not S.serves(q16, q16, q16, None, None, 0.1, 0.125, force=True)
    assert not S.serves(q16.float(), q16.float(), q16.float(), None, None, 0.0, 0.125, force=True)
    assert not S.serves(q16, q16, v48, None, None, 0.0, 0.125, force=True)
    assert not S.serves(v48, v48, v48, None, None, 0.0, 0.125, force=True)  # 48: not a bucket
    assert not S.serves(q16, q16[:, :, :0], q16[:, :, :0], None, None, 0.0, 0.125, force=True)
    assert not S.serves(q16, q16, q16, None, None, 0.0, -0.125, force=True)


@pytest.mark.parametrize("value,ok", [("classic", True), ("SM90", True), ("turbo", False)])
def test_environment_variable_is_read_once_and_checked(value, ok):
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from kernels import attention_sm90 as S\nprint(S.MODE)\n")
    env = dict(os.environ, FASTATTN_TRITON_ATTN=value, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip() == value.lower()
    else:
        assert proc.returncode != 0
        assert "'FASTATTN_TRITON_ATTN' got 'turbo'" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Compile facts (sm_90, no GPU)
# ---------------------------------------------------------------------------------------------
def _triton36_folder():
    folder = os.environ.get("FASTATTN_TRITON36", str(ROOT / ".triton36"))  # make test installs it there
    return folder if (pathlib.Path(folder) / "triton" / "__init__.py").exists() else None


class _Sweeps:
    """Both sweeps (this triton, triton 3.6) started together at the first compile-facts test, each
    with half the cores (FASTATTN_AOT_JOBS overrides), so the two versions' compiles overlap; each
    test then waits for its own."""

    def __init__(self, tmp, wanted):
        self.procs = {}
        runs = [(n, p) for n, p in (("here", None), ("3.6", _triton36_folder())) if n in wanted and (n == "here" or p)]
        cores = os.cpu_count() or 2
        per = os.environ.get("FASTATTN_AOT_JOBS", str(max(1, cores // max(1, len(runs)))))
        for name, pythonpath in runs:
            env = dict(os.environ)
            env.pop("TRITON_INTERPRET", None)
            env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
            if pythonpath:
                env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
            out = tmp / f"sm90_aot_{name}.json"
            log = open(tmp / f"sm90_aot_{name}.log", "w+")
            proc = subprocess.Popen([sys.executable, "-m", "aot.sm90", "--jobs", per, "--json", str(out)],
                                    cwd=ROOT / "tests", env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
            self.procs[name] = (proc, out, log)

    def rows(self, name) -> list[dict]:
        proc, out, log = self.procs[name]
        rc = proc.wait(timeout=3600)
        log.seek(0)
        text = log.read()
        assert out.exists(), f"aot.sm90 ({name}) produced no result (rc {rc}):\n{text[-4000:]}"
        print(text)
        return json.loads(out.read_text())

    def close(self):
        for proc, _, log in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


@pytest.fixture(scope="module")
def sweeps(request, tmp_path_factory):
    selected = {item.name for item in request.session.items}  # start only the sweeps a selected test reads
    wanted = {name for name, test in (("here", "test_sm90_compile_facts_triton_here"),
                                      ("3.6", "test_sm90_compile_facts_triton36")) if test in selected}
    s = _Sweeps(tmp_path_factory.mktemp("sm90_aot"), wanted)
    yield s
    s.close()


_FACTS = ("regs", "smem", "stack", "wgmma", "tma_loads", "tma_stores", "mma_sync", "cp_async", "wgmma_tiles")


def _check_rows(rows, version_prefix):
    from aot import sm90 as _sm90_aot

    B = _bwd_module()
    assert rows and all(r["triton"].startswith(version_prefix) for r in rows), {r["triton"] for r in rows}
    assert len(rows) == len(_sm90_aot.all_jobs())
    bad = []
    for r in rows:
        what = f"triton {r['triton']} {r['kernel']} {r['variant']} {r['dtype']} hd{r['head_dim']} {r['loads']} {r['config']}"
        if r["error"]:
            bad.append(f"{what}: does not compile: {r['error']}")
            continue
        if r["smem"] > SMEM_LIMIT_SM90:
            bad.append(f"{what}: shared memory {r['smem']} B > {SMEM_LIMIT_SM90} B")
        if r.get("spill_stores", 0) or r.get("spill_loads", 0) or r.get("stack", 0) or r.get("local", 0):
            bad.append(f"{what}: spills (ptxas {r.get('spill_stores')}/{r.get('spill_loads')} B, "
                       f"stack {r.get('stack')} B, local {r.get('local')} B)")
        if r.get("regs") is None:
            bad.append(f"{what}: no register count")
        if r["wgmma"] == 0 or r["mma_sync"]:
            bad.append(f"{what}: {r['wgmma']} wgmma.mma_async, {r['mma_sync']} mma.sync (expected wgmma only)")
        if (r["loads"] == "tma") != (r["tma_loads"] > 0):
            bad.append(f"{what}: {r['tma_loads']} cp.async.bulk.tensor loads with loads={r['loads']}")
        if r["kernel"] == "bwd":
            # the resident-row products (phase 1: K Q^T, V dO^T -> BLOCK_N x BLOCK_M; dK, dV -> BLOCK_N x hd;
            # phase 2 alike) are wgmma with whole warpgroups of 64 distinct rows: no product whose rows
            # are repeated across warps (rows < 16 x warps along them), and the dK/dV accumulators' tile
            # (BLOCK_N x hd) among them
            bn = int(r["config"].split("/BN")[1].split()[0])
            tiles = [tuple(t) for t in r["wgmma_tiles"]]
            small = [t for t in tiles if t[0] < 16 * t[2] or t[2] % 4]
            if small:
                bad.append(f"{what}: wgmma products with fewer rows than their warps cover: {small}")
            if not any(t[0] == bn and t[1] == r["head_dim"] for t in tiles):
                bad.append(f"{what}: no {bn}x{r['head_dim']} (dK/dV) wgmma product among {tiles}")
    # bf16 (compiled for one case per bucket and load path): the same facts as that case in fp16
    f16 = {(r["kernel"], r["head_dim"], r["variant"], r["loads"], r["config"]): r for r in rows if r["dtype"] == "f16"}
    for r in rows:
        if r["dtype"] == "bf16" and not r["error"]:
            twin = f16[(r["kernel"], r["head_dim"], r["variant"], r["loads"], r["config"])]
            diff = {f: (twin.get(f), r.get(f)) for f in _FACTS if twin.get(f) != r.get(f)}
            if diff:
                bad.append(f"triton {r['triton']} {r['kernel']} hd{r['head_dim']} {r['variant']} {r['loads']}: "
                           f"bf16 differs from fp16 (fp16, bf16): {diff}")
    assert not bad, f"{len(bad)} of {len(rows)} compiles fail:\n" + "\n".join(bad)
    assert {r["kernel"] for r in rows} == {"fwd", "bwd"}  # the forward and the backward both issue wgmma
    assert {r["dtype"] for r in rows} == {"f16", "bf16"}
    # the backward's most used cases have a tile (a spill-free wgmma tile, checked above)
    for key in ((64, "plain"), (128, "plain")):
        assert key in B.BWD_SM90_CONFIGS
        assert any(r["kernel"] == "bwd" and (r["head_dim"], r["variant"]) == key for r in rows)


def test_sm90_compile_facts_triton_here(sweeps):
    import triton

    _check_rows(sweeps.rows("here"), triton.__version__)


def test_sm90_compile_facts_triton36(sweeps):
    if "3.6" not in sweeps.procs:
        pytest.skip(f"triton 3.6 is not installed in {os.environ.get('FASTATTN_TRITON36', ROOT / '.triton36')} "
                    "(pip install --target DIR --no-deps triton==3.6.0, or set FASTATTN_TRITON36)")
    _check_rows(sweeps.rows("3.6"), "3.6")


# ---------------------------------------------------------------------------------------------
# Backward (kernels/attention_sm90_bwd.py) under the interpreter
# ---------------------------------------------------------------------------------------------
def _bwd_module():
    return _kernel_module("attention_sm90_bwd")


def _kernel_tests():
    """tests/test_triton_attention_kernels.py: its float64 reference, inputs, masks and the classic
    kernels (which give the forward's out and lse)."""
    sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("test_triton_attention_kernels")


def _dev(t):
    return None if t is None else t.to(DEVICE)


def _helpers():
    sys.path.insert(0, str(ROOT / "tests"))
    return importlib.import_module("helpers")


def _run_bwd(n, hq, hkv, l, s, e, ev, dtype, mask_kind=None, use_kpm=False, causal=False, p=0.0, tma=False,
             seed=0, split=None):
    T, B = _kernel_tests(), _bwd_module()
    q, k, v, do = T._inputs(n, hq, hkv, l, s, e, ev, dtype, seed)
    mask = T._mask(mask_kind, n, hq, l, s, dtype)
    mask = None if mask is None else mask.float()  # the contract: float32 additive view
    kpm = T._kpm(n, s) if use_kpm else None
    scale = 1.0 / math.sqrt(e)
    seed_t = torch.tensor([987654321 + seed], dtype=torch.int64) if p > 0 else None
    keep = T.philox.attention_keep_mask(int(seed_t), p, n, hq, l, s) if p > 0 else None
    args = [_dev(t) for t in (q, k, v, mask, kpm)]
    out, lse = T.A.attention_forward(*args, p, causal, scale, seed_t)
    grads = B.backward(_dev(do), args[0], args[1], args[2], out, lse, args[3], args[4], p, causal, scale, seed_t,
                       force=True, use_tma=tma, split=split)
    assert grads is not None, "the sm_90 backward declined a case it serves"
    return [g.cpu() for g in grads], (q, k, v, do, mask, kpm, causal, scale, p, keep)


BWD_CASES = [  # (N, Hq, Hkv, L, S, E, Ev, dtype, mask_kind, kpm, causal, dropout_p)
    (1, 2, 1, 37, 29, 64, 64, torch.float16, None, False, False, 0.0),
    (1, 2, 1, 37, 29, 64, 64, torch.bfloat16, None, False, True, 0.0),
    (2, 2, 1, 33, 45, 25, 17, torch.float16, None, True, True, 0.0),       # the classifier's E, Ev != E
    (2, 2, 1, 33, 17, 32, 32, torch.bfloat16, "bool4d", False, False, 0.3),
    (1, 4, 2, 40, 70, 64, 64, torch.bfloat16, "float_n1", True, True, 0.2),  # GQA 4/2, everything on
    (2, 2, 2, 17, 33, 80, 80, torch.float16, "float2d", False, True, 0.0),
    (1, 1, 1, 19, 23, 128, 128, torch.float16, None, True, False, 0.25),
]


def _case_id(c):
    flags = "".join(f"_{f}" for f, on in (("kpm", c[9]), ("causal", c[10]), ("drop", c[11])) if on)
    return "n%d_hq%d_hkv%d_l%d_s%d_e%d_ev%d" % c[:7] + f"_{str(c[7])[6:]}_{c[8] or 'nomask'}{flags}"


@pytest.mark.parametrize("use_tma,split", [(True, False), (False, False), (True, True)],
                         ids=["tma", "plain", "tma_split"])
@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_backward_matches_float64_reference(case, use_tma, split):
    # split: SPLIT_DKDV, phase 1 as a dV pass then a dK pass (the hd-128 tile's layout)
    n, hq, hkv, l, s, e, ev, dtype, mask_kind, kpm, causal, p = case
    T = _kernel_tests()
    grads, ctx = _run_bwd(n, hq, hkv, l, s, e, ev, dtype, mask_kind, kpm, causal, p, use_tma, split=split)
    _, _, dq64, dk64, dv64 = T._grads64(*ctx)
    _, dqs, dks, dvs = T._grads_same_dtype(*ctx)
    for name, got, ref, same in zip(("dq", "dk", "dv"), grads, (dq64, dk64, dv64), (dqs, dks, dvs)):
        assert got.dtype == dtype and got.shape == ref.shape
        check_bound(name, got, same, ref)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_backward_is_bitwise_deterministic(split):
    a, _ = _run_bwd(2, 4, 2, 33, 65, 32, 32, torch.float16, "float2d", True, True, 0.2, tma=True, split=split)
    b, _ = _run_bwd(2, 4, 2, 33, 65, 32, 32, torch.float16, "float2d", True, True, 0.2, tma=True, split=split)
    for name, x, y in zip(("dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), f"{name}: two runs differ"


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_bf16_rounding_of_p_and_ds_is_what_the_gpu_does(split):
    # On the GPU, P and dS are rounded to bf16 before the dV / dK products; the interpreter widens bf16
    # operands to fp32 (kernels/attention.py), so the kernel rounds them itself (_operand). One query
    # row and q = dO = c (c = 1 + 2^-7, exact in bf16) make each dV / dK element one product,
    # bf16(bf16(P) * c) when P is rounded first and bf16(P * c) when not: the kernel must give the first.
    T, B = _kernel_tests(), _bwd_module()
    e, s, c = 64, 96, 1.0078125
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 1, s, e, generator=g).to(torch.bfloat16) for _ in range(2))
    q = torch.full((1, 1, 1, e), c, dtype=torch.bfloat16)
    do = torch.full((1, 1, 1, e), c, dtype=torch.bfloat16)
    scale = 0.125
    out, lse = T.A.attention_forward(*(_dev(t) for t in (q, k, v)), None, None, 0.0, False, scale, None)
    dq, dk, dv = (t.cpu() for t in B.backward(_dev(do), *(_dev(t) for t in (q, k, v)), out, lse, None, None, 0.0,
                                              False, scale, None, force=True, use_tma=False, split=split))
    sc = (q.double() @ k.double().transpose(-1, -2)) * scale
    p = torch.exp(sc - lse.cpu().double()[..., None])                              # (1, 1, 1, S)
    dp = do.double() @ v.double().transpose(-1, -2)
    ds = p * (dp - (do.double() * out.cpu().double()).sum(-1, keepdim=True))

    def bf(t):
        # bf16 as the kernel's float -> bf16 conversion makes it: round to nearest even on the GPU; the
        # triton 3.9 interpreter truncates (measured: it matches x's top 16 bits, not torch's rounding)
        if DEVICE == "cpu":
            t = (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
        return t.to(torch.bfloat16).double()

    for name, got, val, mult in (("dv", dv, p, c), ("dk", dk, ds, c * scale)):
        got = got.double()[0, 0]                                                   # (S, E), equal columns
        val = val[0, 0, 0][:, None].expand_as(got)
        rounded_first = (got == bf(bf(val) * mult)).double().mean().item()
        not_rounded = (got == bf(val * mult)).double().mean().item()
        assert rounded_first >= 0.95 and not_rounded <= rounded_first - 0.1, \
            f"{name}: {rounded_first:.2f} of the elements match P/dS rounded to bf16 first, {not_rounded:.2f} unrounded"


def test_backward_declines_what_it_does_not_serve():
    B = _bwd_module()
    q16 = torch.randn(1, 1, 8, 64, dtype=torch.float16)
    assert B.serves(q16, q16, q16, force=True)
    assert not B.serves(q16.float(), q16.float(), q16.float(), force=True)  # fp32: the classic backward
    assert not B.serves(q16, q16[:, :, :0], q16[:, :, :0], force=True)
    lse = torch.zeros(1, 1, 8)
    assert B.backward(q16, q16, q16, q16, q16, lse, None, None, 0.0, False, 0.1, None) is None  # not sm_90
    # every table entry is a known (bucket, variant), and a launch's key finds its tile
    assert set(B.BWD_SM90_CONFIGS) <= {(hd, var) for hd in B.HEAD_DIM_BUCKETS for var in B.VARIANTS}
    assert B._config(q16, q16, None, 0.0) is B.BWD_SM90_CONFIGS[(64, "plain")]
    # a plain-load launch takes its own tile where the table says so, None: the classic backward
    q128 = torch.randn(1, 1, 8, 128, dtype=torch.float16)
    mask = torch.zeros(1, 1, 8, 8)
    assert B._config(q128, q128, None, 0.0, use_tma=True) is B.BWD_SM90_CONFIGS[(128, "plain")]
    assert B._config(q128, q128, None, 0.0, use_tma=False) is B.BWD_SM90_PLAIN_LOAD_CONFIGS[(128, "plain")]
    assert B._config(q16, q16, mask, 0.1, use_tma=True) is B.BWD_SM90_CONFIGS[(64, "mask+drop")]
    assert B._config(q16, q16, mask, 0.1, use_tma=False) is B.BWD_SM90_PLAIN_LOAD_CONFIGS[(64, "mask+drop")] is None
    for (hd, var), cfg in B.BWD_SM90_CONFIGS.items():
        assert B.config_for(hd, var, True) is cfg
        assert any(case[:2] == (hd, var) and case[3] for case in B.compile_cases())  # every tile is compiled
    assert B._tma_possible(q16, q16, q16, q16) and not B._tma_possible(q16[..., :60], q16, q16[..., :60], q16)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("case", [(torch.bfloat16, 16, 32, 16, 16, 20.0), (torch.float16, 16, 32, 8, 8, 3000.0)],
                         ids=["bf16-scale20", "f16-scale3000"])
def test_backward_large_logits_within_bound(case, split):
    # |lse| >= 32: P from the delta pre-pass's split log-sum-exp (the classic backward's, tests/
    # test_regressions.py's large-logit case), dQ = scale * dS K multiplying any rounding by the scale
    T, B = _kernel_tests(), _bwd_module()
    dt, l, s, e, ev, scale = case
    q, k, v, go, ref, same = _helpers().large_logit_problem(dt, l, s, e, ev, scale, 0)
    out, lse = T.A.attention_forward(*(_dev(t) for t in (q, k, v)), None, None, 0.0, False, scale, None)
    grads = B.backward(_dev(go), *(_dev(t) for t in (q, k, v)), out, lse, None, None, 0.0, False, scale, None,
                       force=True, use_tma=False, split=split)
    if dt == torch.bfloat16:
        # bf16: the kernel rounds P and dS to bf16 operands, as on the GPU (_operand); torch's math SDPA
        # keeps dS in fp32 (it was measured 4.4-4.6x better on dq), so the peer is that design in float64
        same = _helpers().rounded_operand_grads(q, k, v, go, out, scale, truncate=DEVICE == "cpu")
    for name, got, t, r64 in zip(("dq", "dk", "dv"), grads, same, ref):
        check_bound(name, got.cpu(), t, r64)
