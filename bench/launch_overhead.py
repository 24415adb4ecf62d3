"""Host cost of the Triton attention launchers, without a GPU: the Python work of one call up to the kernel
launch (validation, path choice, tile lookup, allocations, argument packing), with every kernel launch
replaced by a no-op, per call in microseconds, the small path (kernels/attention_small.py) against the
classic one (kernels/attention.py), on the classifier's shape (N 32, H 4, L = S = 256, E 25, fp16).

    python bench/launch_overhead.py [--calls 2000] [--rounds 7]

CPU tensors stand in for CUDA ones (the launchers are called directly; the small path's device test is
lifted for the measurement), so torch.empty is the CPU allocator's, not CUDA's caching allocator, and
Triton's own launch cost (argument binding, the compiled-kernel lookup, the driver call: one per kernel
launched) is not included: the table also gives the launches each call makes. The figure is the median
of the rounds, interleaved (small, classic, small, ...); on a loaded machine only the ratio holds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing but count."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    try:
        from fastattn.kernels import attention as A, attention_small as S
    except ImportError:
        from kernels import attention as A, attention_small as S
    stubs = {}
    for mod, names in ((A, ("_attn_fwd_kernel", "_attn_bwd_delta_kernel", "_attn_bwd_dkdv_kernel",
                            "_attn_bwd_dq_kernel", "_kv_range_kernel")),
                       (S, ("_small_fwd_kernel", "_small_bwd_kernel"))):
        for name in names:
            stubs[name] = _NoLaunch()
            setattr(mod, name, stubs[name])
    S.INTERPRET = True  # lifts the small path's CUDA-device test for CPU tensors (the decision's cost is the same)
    A.INTERPRET = True  # the classic launcher's likewise: key padding takes the CUDA path (_kv_range_kernel)

    n, h, l, e = 32, 4, 256, 25
    dt = torch.float16
    q, k, v = (torch.randn(n, h, l, e, dtype=dt) for _ in range(3))
    out, lse, do = torch.randn(n, h, l, e, dtype=dt), torch.zeros(n, h, l), torch.randn(n, h, l, e, dtype=dt)
    kpm = torch.zeros(n, l, dtype=torch.bool)
    kpm[:, 200:] = True
    mask = torch.randn(l, l).expand(n, h, l, l)
    seed = torch.tensor([7], dtype=torch.int64)
    cases = {"plain": (None, None, 0.0, None), "kpm": (None, kpm, 0.0, None),
             "mask+kpm+dropout": (mask, kpm, 0.1, seed)}
    print(f"launcher host cost, us per call (median of {args.rounds} rounds of {args.calls} calls; kernels not "
          f"launched), classifier shape N{n} H{h} L{l} E{e} fp16, CPU tensors; torch {torch.__version__}")
    print(f"{'case':18s} {'pass':4s} {'small':>8s} {'classic':>8s} {'ratio':>6s}  launches small/classic")
    for cname, (m, kp, p, sd) in cases.items():
        for pas in ("fwd", "bwd"):
            if pas == "fwd":
                def call():
                    return A.attention_forward(q, k, v, m, kp, p, False, 0.2, sd)
            else:
                def call():
                    return A.attention_backward(do, q, k, v, out, lse, m, kp, p, False, 0.2, sd)
            times = {"small": [], "classic": []}
            launches = {}
            for _ in range(args.rounds):
                for mode in ("small", "classic"):
                    S.use_small(mode == "small")
                    call()  # warm: the small path's per-signature decision is cached here
                    before = sum(s.launches for s in stubs.values())
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        call()
                    times[mode].append((time.perf_counter() - t0) / args.calls * 1e6)
                    launches[mode] = (sum(s.launches for s in stubs.values()) - before) // args.calls
            sm, cl = statistics.median(times["small"]), statistics.median(times["classic"])
            print(f"{cname:18s} {pas:4s} {sm:8.1f} {cl:8.1f} {cl / sm:6.2f}  {launches['small']}/{launches['classic']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
