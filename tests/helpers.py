"""Helpers shared by the kernel test files (plain functions; the fixtures are in conftest.py).

- run_python / assert_python_ok: a snippet in a fresh interpreter, for knobs read once per process.
- counted: asserts that a path counter (torch.ops.fastattn_amx.fwd_calls, ...) moved by the expected
  number of calls inside a `with` block, so a silent fall back to another kernel fails.
- attention_inputs / expanded_mask / key_padding / check_dead_rows: the inputs and the no-key-row checks of the
  CPU attention kernel tests.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def aot_env(version: str) -> dict:
    """The environment of a compile-only (AOT) subprocess: no interpreter, FP fusion on as on a GPU, and for
    version "3.6" triton 3.6.0 from .triton36 first on the path (the test skips where it is missing)."""
    import pytest
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if version == "3.6":
        folder = os.path.join(ROOT, ".triton36")
        if not os.path.isdir(os.path.join(folder, "triton")):
            pytest.skip("triton 3.6.0 is not in .triton36 (make test installs it)")
        env["PYTHONPATH"] = os.pathsep.join([folder] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_python(code: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Runs `code` with `python -c` from the repository root, the environment plus `env`."""
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_python_ok(code: str, timeout: int = 300, **env: str) -> None:
    """run_python, which must exit 0 and print "ok"."""
    res = run_python(code, timeout, **env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@contextlib.contextmanager
def counted(counter, expected: int = 1, what: str = "the expected kernel path did not serve the call"):
    """The `with` body must move `counter()` (a path's call count) by exactly `expected`."""
    before = int(counter())
    yield
    got = int(counter()) - before
    assert got == expected, f"{what} ({got} calls counted, expected {expected})"


def kw_id(kw: dict) -> str:
    """A pytest id for a case given as a dict of keyword arguments: "l70-s300-causalTrue"."""
    return "-".join(f"{k}{v}" for k, v in kw.items())


def attention_inputs(n, hq, hkv, l, s, e, ev, dtype, seed=0):
    """q (n, hq, l, e), k (n, hkv, s, e), v (n, hkv, s, ev) in `dtype`, drawn from a generator seeded
    with `seed`; returns them and the generator, for what the case draws next."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, hq, l, e, generator=gen).to(dtype)
    k = torch.randn(n, hkv, s, e, generator=gen).to(dtype)
    v = torch.randn(n, hkv, s, ev, generator=gen).to(dtype)
    return q, k, v, gen


def expanded_mask(kind, n, h, l, s, dtype, gen, dead_row=True):
    """An additive mask in `dtype` as the dispatcher hands it to the kernels: an (n, h, l, s) view,
    strides 0 where broadcast. None for kind None or "none". "bool2d" is a converted bool mask (keep
    -> 0, drop -> -inf) where query 0 sees no key (dead_row) or every query keeps its diagonal."""
    if kind in (None, "none"):
        return None
    if kind == "float2d":  # (L, S): strides (0, 0, S, 1)
        return torch.randn(l, s, generator=gen).to(dtype).expand(n, h, l, s)
    if kind == "bool2d":
        keep = torch.rand(l, s, generator=gen) > 0.4
        if dead_row:
            keep[0] = False
        else:
            keep[torch.arange(min(l, s)), torch.arange(min(l, s))] = True
        return torch.zeros(l, s).masked_fill(~keep, -math.inf).to(dtype).expand(n, h, l, s)
    if kind == "bool_nhls":  # a converted per-(batch, head) bool mask, (N, H, L, S) contiguous
        keep = torch.rand(n, h, l, s, generator=gen) > 0.5
        return torch.zeros(n, h, l, s).masked_fill(~keep, -math.inf).to(dtype)
    if kind == "float_n1ls":  # (N, 1, L, S): head stride 0, some -inf
        m = torch.randn(n, 1, l, s, generator=gen).masked_fill(torch.rand(n, 1, l, s, generator=gen) < 0.2, -math.inf)
        return m.to(dtype).expand(n, h, l, s)
    if kind == "per_batch":  # (N, 1, L, S)
        return torch.randn(n, 1, l, s, generator=gen).to(dtype).expand(n, h, l, s)
    if kind == "full":
        return torch.randn(n, h, l, s, generator=gen).to(dtype)
    if kind == "col":  # (1, 1, 1, S): strides (0, 0, 0, 1)
        return torch.randn(1, 1, 1, s, generator=gen).to(dtype).expand(n, h, l, s)
    if kind == "row":  # (L, 1): key stride 0
        return torch.randn(l, 1, generator=gen).to(dtype).expand(n, h, l, s)
    if kind == "transposed":  # an (S, L) tensor seen as (L, S): key stride L
        return torch.randn(s, l, generator=gen).to(dtype).t().expand(n, h, l, s)
    raise ValueError(kind)


def key_padding(n, s, gen) -> torch.Tensor:
    """A random (n, s) key_padding_mask (True = ignore): key 0 of every batch row kept, except in the last
    batch row, which sees no key at all."""
    pad = torch.rand(n, s, generator=gen) > 0.7
    pad[:, 0] = False
    pad[-1] = True
    return pad


def check_dead_rows(name, out, lse, ref_lse) -> torch.Tensor:
    """Rows that see no key (reference lse +inf) must give out 0 and lse +inf; returns the live rows."""
    dead = torch.isinf(ref_lse)
    assert (lse[dead] == math.inf).all(), f"{name}: rows that see no key must have lse +inf"
    assert (out[dead] == 0).all(), f"{name}: rows that see no key must give out 0"
    return ~dead


def large_logit_problem(dt, l, s, e, ev, scale, seed):
    """Inputs (q, k, v, grad_out in dt, (1, 1, rows, dims)) with random scores times `scale`, and the
    gradients of softmax(q k^T scale) v in float64 (the reference) and from torch's math SDPA in dt
    (torch's own error, for fastattn.testing's bound)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(seed)
    q64, k64, v64 = (torch.randn(1, 1, n, d, generator=g, dtype=torch.float64) for n, d in ((l, e), (s, e), (s, ev)))
    go = torch.randn(1, 1, l, ev, generator=g, dtype=torch.float64).to(dt)
    q, k, v = (t.to(dt) for t in (q64, k64, v64))
    r = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = torch.autograd.grad(torch.softmax(r[0] @ r[1].transpose(-1, -2) * scale, -1) @ r[2], r, go.double())
    t_ = [t.clone().requires_grad_(True) for t in (q, k, v)]
    with sdpa_kernel([SDPBackend.MATH]):
        same = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(*t_, scale=scale), t_, go)
    return q, k, v, go, ref, same


def bf16_operand(t, truncate: bool):
    """t rounded to bf16 as a kernel's float -> bf16 conversion makes it, back in float64: round to
    nearest even on the GPU; the triton 3.9 interpreter truncates (it keeps x's top 16 bits)."""
    if truncate:
        t = (t.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return t.to(torch.bfloat16).double()


def rounded_operand_grads(q, k, v, go, out, scale, truncate: bool, delta_from_p: str = "split"):
    """dq, dk, dv of softmax(q k^T scale) v as a bf16 GPU kernel computes them: float64 except for its
    roundings - P and dS become bf16 operands before dV = P^T dO, dK = scale dS^T Q and dQ = scale dS K
    (FA2 does the same), and the stores round. delta: rowsum(P dP) on rows with |lse| >= 32 and
    rowsum(dO * out) from the bf16 output elsewhere (delta_from_p="split": the classic and sm_90
    backwards' pre-pass), or rowsum(P dP) on every row ("always": kernels/attention_small.py). Its
    distance to the exact gradients is this design's error: a kernel that rounds so is held to 2x it."""
    q, k, v, go, out = (t.detach().double().cpu() for t in (q, k, v, go, out))
    sc = q @ k.transpose(-1, -2) * scale
    p, lse = torch.softmax(sc, -1), torch.logsumexp(sc, -1, keepdim=True)
    dp = go @ v.transpose(-1, -2)
    from_p = (p * dp).sum(-1, keepdim=True)
    delta = from_p if delta_from_p == "always" else torch.where(lse.abs() >= 32, from_p, (go * out).sum(-1, keepdim=True))
    ds = p * (dp - delta)
    pb, dsb = bf16_operand(p, truncate), bf16_operand(ds, truncate)
    grads = (scale * dsb @ k, scale * dsb.transpose(-1, -2) @ q, pb.transpose(-1, -2) @ go)
    return [bf16_operand(g, truncate).to(torch.bfloat16) for g in grads]
