"""The device check's short speed table: fastattn's cuda backend and the Triton kernel sets (the small
path of kernels/attention_small.py, FASTATTN_TRITON_SMALL; the sm_90 kernels and the classic ones,
FASTATTN_TRITON_ATTN's two modes; all switched in this one process on the same inputs; off sm_90 the
sm90 column runs the classic kernels, and where the small path does not serve a shape its column
runs the next kernels in line) against SDPA's flash and cuDNN backends, forward and forward+backward, in TFLOP/s, written as markdown one row at a time
(so a run cut off keeps its rows). Run by bench/gpu_check.sh; standalone:

    python bench/gpu_speed.py --out speed.md [--seconds 55] [--full]

Shapes: fp16 and bf16, head dim 64 and 128, L = S from 1k to 16k with N * L = 16384 tokens and
H * E = 2048, causal off and on; first the classifier's shape (head dim 25, L 256, N 32, H 4).
FLOPs as flash-attention counts them: forward 4 * N * H * L * S * E (half of it when causal),
forward+backward 3.5 times that. Timings use CUDA events around a few calls after one warm-up.
A figure holds only as a ratio against the peers in the same row (same run, same machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

IMPLS = ("fastattn cuda", "triton small", "triton sm90", "triton classic", "sdpa flash", "sdpa cudnn")


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel([which]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def sm90_module():
    """kernels/attention_sm90.py as the installed package has it (fastattn.kernels), else from the checkout."""
    try:
        from fastattn.kernels import attention_sm90
    except ImportError:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
        from kernels import attention_sm90
    return attention_sm90


def small_module():
    """kernels/attention_small.py, as sm90_module() finds its module."""
    sm90_module()
    try:
        from fastattn.kernels import attention_small
    except ImportError:
        from kernels import attention_small
    return attention_small


def _fastattn(backend: str, triton_mode: str | None = None, small: bool = False):
    import fastattn

    def run(q, k, v, causal):
        if triton_mode is not None:  # the modes are read at launch: forward and backward both follow them
            sm90_module().use_mode(triton_mode)
            small_module().use_small(small)
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)
    return run


def runners():
    return {"fastattn cuda": _fastattn("cuda"), "triton small": _fastattn("triton", "sm90", small=True),
            "triton sm90": _fastattn("triton", "sm90"),
            "triton classic": _fastattn("triton", "classic"),
            "sdpa flash": _sdpa("FLASH_ATTENTION"), "sdpa cudnn": _sdpa("CUDNN_ATTENTION")}


def cases(full: bool):
    yield from (("fwd", dt, 25, 32, 4, 256, c) for dt in (torch.float16, torch.bfloat16) for c in (False, True))
    yield from (("fwd+bwd", dt, 25, 32, 4, 256, c) for dt in (torch.float16, torch.bfloat16) for c in (False, True))
    lengths = (1024, 2048, 4096, 8192, 16384) if full else (1024, 4096, 16384)
    for mode in ("fwd", "fwd+bwd"):
        for dt in (torch.float16, torch.bfloat16):
            for e in (64, 128):
                for length in lengths:
                    for causal in (False, True):
                        yield mode, dt, e, 16384 // length, 2048 // e, length, causal


def flops(mode, n, h, length, e, causal):
    f = 4.0 * n * h * length * length * e * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd+bwd" else 1.0)


def time_one(fn, mode, q, k, v, causal, min_seconds=0.02, max_reps=20):
    """Seconds per call: one warm-up call, then repeated calls timed with CUDA events."""
    g = None

    def call():
        nonlocal g
        out = fn(q, k, v, causal)
        if mode == "fwd+bwd":
            if g is None:
                g = torch.randn_like(out)
            torch.autograd.grad(out, (q, k, v), g)
    call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps, total = 0, 0.0
    while reps < 3 or (total < min_seconds and reps < max_reps):
        start.record()
        call()
        end.record()
        end.synchronize()
        total += start.elapsed_time(end) / 1e3
        reps += 1
    return total / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file, written one row at a time")
    ap.add_argument("--seconds", type=float, default=55.0, help="start no row after this many seconds")
    ap.add_argument("--full", action="store_true", help="L 1k, 2k, 4k, 8k, 16k (else 1k, 4k, 16k)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    if not torch.cuda.is_available():
        with open(args.out, "w") as f:
            f.write("no CUDA device: no speed table\n")
        print("gpu_speed: no CUDA device")
        return 3
    run = runners()
    errors: dict[str, str] = {}
    name = torch.cuda.get_device_name()
    jsonl = open(args.out.rsplit(".", 1)[0] + ".jsonl", "w")
    with open(args.out, "w") as md:
        md.write(f"### Speed, TFLOP/s ({name}, torch {torch.__version__})\n\n"
                 "N * L = 16384 tokens, H * E = 2048 (except the classifier shape, first); "
                 "ratios hold within a row only.\n\n"
                 "| mode | dtype | E | N x H x L | causal | " + " | ".join(IMPLS)
                 + " | cuda / flash | sm90 / classic | small / classic |\n"
                 "|---|---|---:|---|---|" + "---:|" * (len(IMPLS) + 3) + "\n")
        md.flush()
        rows = 0
        for mode, dt, e, n, h, length, causal in cases(args.full):
            if time.monotonic() - t_start > args.seconds:
                md.write(f"\n(stopped after {rows} rows: the {args.seconds:.0f} s budget was spent)\n")
                break
            torch.manual_seed(0)
            q, k, v = (torch.randn(n, h, length, e, device="cuda", dtype=dt, requires_grad=(mode == "fwd+bwd"))
                       for _ in range(3))
            tf = {}
            for impl in IMPLS:
                try:
                    sec = time_one(run[impl], mode, q, k, v, causal)
                    tf[impl] = flops(mode, n, h, length, e, causal) / sec / 1e12
                except Exception as exc:  # noqa: BLE001 - an unsupported shape is a table entry, not a stop
                    torch.cuda.synchronize()
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                    if impl not in errors:
                        errors[impl] = msg
                        print(f"gpu_speed: {impl} {mode} {dt} E{e} L{length}: {msg}", file=sys.stderr)
            cells = [f"{tf[i]:.1f}" if i in tf else "n/a" for i in IMPLS]
            ratio = (f"{tf['fastattn cuda'] / tf['sdpa flash']:.2f}"
                     if "fastattn cuda" in tf and "sdpa flash" in tf else "n/a")
            ratio += " | " + (f"{tf['triton sm90'] / tf['triton classic']:.2f}"
                              if "triton sm90" in tf and "triton classic" in tf else "n/a")
            ratio += " | " + (f"{tf['triton small'] / tf['triton classic']:.2f}"
                              if "triton small" in tf and "triton classic" in tf else "n/a")
            dts = str(dt).replace("torch.", "")
            md.write(f"| {mode} | {dts} | {e} | {n}x{h}x{length} | {'yes' if causal else 'no'} | "
                     + " | ".join(cells) + f" | {ratio} |\n")
            md.flush()
            jsonl.write(json.dumps({"mode": mode, "dtype": dts, "E": e, "N": n, "H": h, "L": length,
                                    "causal": causal, "tflops": tf}) + "\n")
            jsonl.flush()
            rows += 1
            del q, k, v
        if errors:
            md.write("\nn/a: the first error of each implementation: "
                     + "; ".join(f"{i}: {m}" for i, m in errors.items()).replace("|", "/") + "\n")
    print(f"gpu_speed: {rows} rows in {time.monotonic() - t_start:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
