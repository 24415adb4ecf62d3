"""Scratch timing of the C++ CPU attention kernels against torch SDPA (temporary; not the bench suite).

python bench/scratch_cpu_attention.py [--reps 7] [--only fwd|bwd]
Prints best-of-reps milliseconds per call and the ratio torch/fastattn (>1 = fastattn faster).
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

try:
    import fastattn._C  # noqa: F401
    HAVE = hasattr(torch.ops.fastattn, "attention_fwd")
except Exception:  # pragma: no cover - scratch
    HAVE = False


def best_ms(fn, reps, inner):
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best * 1e3


def case(n, h, l, e, dtype, mode, reps):
    torch.manual_seed(0)
    q = torch.randn(n, h, l, e, dtype=dtype)
    k = torch.randn(n, h, l, e, dtype=dtype)
    v = torch.randn(n, h, l, e, dtype=dtype)
    scale = 1 / math.sqrt(e)
    go = torch.randn(n, h, l, e, dtype=dtype)
    inner = max(1, int(2e8 / (n * h * l * l * e * (3 if mode == "fwd+bwd" else 1))))
    if mode == "fwd":
        t_ref = best_ms(lambda: F.scaled_dot_product_attention(q, k, v), reps, inner)
        fa = lambda: torch.ops.fastattn.attention_fwd(q, k, v, None, None, 0.0, False, scale, None)
    else:
        qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))

        def tref():
            o = F.scaled_dot_product_attention(qr, kr, vr)
            torch.autograd.grad(o, (qr, kr, vr), go)
        t_ref = best_ms(tref, reps, inner)

        def fa():
            o, lse = torch.ops.fastattn.attention_fwd(q, k, v, None, None, 0.0, False, scale, None)
            torch.ops.fastattn.attention_bwd(go, q, k, v, o, lse, None, None, 0.0, False, scale, None)
    t_fa = best_ms(fa, reps, inner) if HAVE else float("nan")
    print(f"{mode:8s} N{n} H{h} L{l} E{e} {str(dtype)[6:]:9s} torch {t_ref:8.3f} ms  fastattn {t_fa:8.3f} ms"
          f"  ratio {t_ref / t_fa:5.2f}x", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cases = [
        (32, 4, 256, 25, torch.float32, "fwd"),
        (32, 4, 256, 25, torch.float32, "fwd+bwd"),
        (8, 12, 512, 64, torch.float32, "fwd"),
        (8, 12, 512, 64, torch.float32, "fwd+bwd"),
        (32, 4, 256, 25, torch.bfloat16, "fwd"),
        (8, 12, 512, 64, torch.bfloat16, "fwd"),
    ]
    for c in cases:
        if a.only and a.only != c[-1]:
            continue
        case(*c, reps=a.reps)


if __name__ == "__main__":
    main()
