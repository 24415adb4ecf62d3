"""Scratch timing of the CPU fused feed-forward (issue 5) against eager and torch.compile.

Temporary: the benchmark suite proper lives elsewhere in bench/. Best of several repeats, fp32,
torch.set_num_threads(2) (override with --threads). Run: nice python bench/scratch_cpu_ffn.py
"""
from __future__ import annotations

import argparse
import time

import torch

import fastattn  # noqa: F401  (registers torch.ops.fastattn.*)


def best_ms(fn, repeats: int, inner: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d", type=int, default=100)
    ap.add_argument("--f", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--act", default="relu")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--what", default="fwd,train")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    T, D, F = args.tokens, args.d, args.f
    x = torch.randn(T, D)
    l1, l2 = torch.nn.Linear(D, F), torch.nn.Linear(F, D)
    act_mod = {"relu": torch.nn.ReLU(), "gelu": torch.nn.GELU(), "gelu_tanh": torch.nn.GELU("tanh")}[args.act]
    eager = torch.nn.Sequential(l1, act_mod, l2)
    w1, b1, w2, b2 = (p.detach() for p in (l1.weight, l1.bias, l2.weight, l2.bias))
    flops = 2 * T * D * F * 2
    res = {}
    if "fwd" in args.what:
        with torch.no_grad():
            res["eager fwd"] = best_ms(lambda: eager(x), args.repeats)
            res["fused fwd"] = best_ms(
                lambda: torch.ops.fastattn.ffn_fwd(x, w1, b1, w2, b2, args.act, 0.0, None, False), args.repeats)
            if not args.no_compile:
                comp = torch.compile(eager)
                for _ in range(2):
                    comp(x)
                res["compile fwd"] = best_ms(lambda: comp(x), args.repeats)
    if "train" in args.what:
        xg = x.clone().requires_grad_(True)
        g = torch.randn(T, D)

        def eager_step():
            for p in eager.parameters():
                p.grad = None
            xg.grad = None
            eager(xg).backward(g)

        def fused_step():
            out, saved = torch.ops.fastattn.ffn_fwd(x, w1, b1, w2, b2, args.act, 0.0, None, True)
            return torch.ops.fastattn.ffn_bwd(g, x, w1, b1, w2, b2, saved, args.act, 0.0, None)

        res["eager fwd+bwd"] = best_ms(eager_step, args.repeats)
        res["fused fwd+bwd"] = best_ms(fused_step, args.repeats)
        with torch.no_grad():
            out, saved = torch.ops.fastattn.ffn_fwd(x, w1, b1, w2, b2, args.act, 0.0, None, True)
            res["fused fwd(save)"] = best_ms(
                lambda: torch.ops.fastattn.ffn_fwd(x, w1, b1, w2, b2, args.act, 0.0, None, True), args.repeats)
            res["fused bwd"] = best_ms(
                lambda: torch.ops.fastattn.ffn_bwd(g, x, w1, b1, w2, b2, saved, args.act, 0.0, None), args.repeats)
    print(f"T={T} D={D} F={F} act={args.act} threads={args.threads}")
    for k, v in res.items():
        gf = flops * (3 if "bwd" in k and "fwd" in k else 2 if k == "fused bwd" else 1) / v / 1e6
        print(f"  {k:16s} {v:8.2f} ms  {gf:6.1f} GFLOP/s")
    if "fused fwd" in res:
        print(f"  fwd speedup vs eager {res['eager fwd'] / res['fused fwd']:.2f}x")
        if "compile fwd" in res:
            print(f"  fwd speedup vs compile {res['compile fwd'] / res['fused fwd']:.2f}x")
    if "fused fwd+bwd" in res:
        print(f"  fwd+bwd speedup vs eager {res['eager fwd+bwd'] / res['fused fwd+bwd']:.2f}x")


if __name__ == "__main__":
    main()
