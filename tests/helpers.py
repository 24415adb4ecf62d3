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
