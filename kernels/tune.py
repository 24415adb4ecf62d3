"""The explicit tuning run: time candidate tiles on this GPU and write a table configs.py can load.

    python -m fastattn.kernels.tune --out tuned.json [--family attention|ffn|all] [--quick]
    FASTATTN_TRITON_CONFIGS=tuned.json python ...        # the launches use it (read once, at import)

For every key of this GPU's arch family (kernels/configs.py) it runs the op on a representative
shape once per candidate tile (triton.testing.do_bench) and keeps the fastest, writing
[{"key": [...], "tile": "64x64 w4 s3", "ms": ...}, ...]. This is the only place fastattn times
anything; the ops themselves only look tiles up. A candidate that fails to launch here (too much
shared memory) is skipped. The built-in tables are AOT-checked (no spills, triton 3.6 and 3.9); a
tuned table is checked the same way with FASTATTN_TRITON_CONFIGS set:
    cd tests && FASTATTN_TRITON_CONFIGS=../tuned.json python -m aot.attention
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from . import configs as C

ATTN_CANDIDATES = ("128x64 w8 s3", "128x64 w4 s3", "128x32 w8 s3", "64x64 w4 s3", "64x64 w8 s2", "64x32 w8 s2",
                   "32x32 w8 s2", "32x32 w4 s2", "16x32 w8 s2", "32x32 w8 s1", "16x32 w8 s1", "16x16 w8 s1")
FFN_CANDIDATES = {
    "f16": ("128x256x64 w8 s3", "128x128x64 w8 s4", "128x128x64 w8 s3", "64x128x64 w4 s4", "64x64x64 w4 s3",
            "128x128x32 w8 s3", "128x64x32 w8 s3", "64x64x32 w4 s3"),
    "f32": ("128x64x32 w8 s3", "64x64x32 w8 s3", "64x64x32 w8 s2", "32x64x32 w4 s3"),
}


def _time(fn) -> float:
    from triton.testing import do_bench

    try:
        return do_bench(fn, warmup=10, rep=50)
    except Exception:  # a tile that cannot launch on this GPU is no candidate
        return math.inf


def _dtype(dc: str) -> torch.dtype:
    return torch.float16 if dc == "f16" else torch.float32


def tune_attention(arch: int, quick: bool) -> list[dict]:
    from . import attention as A

    rows = []
    for (kernel, dc, hd, seq, var, a), builtin in sorted(C.ATTENTION.items()):
        if a != arch or (quick and hd != 64):
            continue
        torch.backends.cuda.matmul.allow_tf32 = dc == "tf32"
        l = 256 if seq == "short" else 2048
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, do = (torch.randn(4, 8, l, hd, device="cuda", dtype=_dtype(dc), generator=g) for _ in range(4))
        mask = torch.randn(l, l, device="cuda", dtype=q.dtype).expand(4, 8, l, l) if "mask" in var else None
        p = 0.1 if "drop" in var else 0.0
        seed = torch.tensor([1234], dtype=torch.int64) if p else None
        out, lse = A.attention_forward(q, k, v, mask, None, p, False, hd ** -0.5, seed)
        if kernel == "fwd":
            def run():
                A.attention_forward(q, k, v, mask, None, p, False, hd ** -0.5, seed)
        else:
            def run():
                A.attention_backward(do, q, k, v, out, lse, mask, None, p, False, hd ** -0.5, seed)
        key = (kernel, dc, hd, seq, var, a)
        best = (math.inf, builtin)
        for text in ATTN_CANDIDATES:
            C.ATTENTION[key] = C.parse(text)
            best = min(best, (_time(run), C.ATTENTION[key]), key=lambda x: x[0])
        C.ATTENTION[key] = best[1]
        rows.append({"key": list(key), "tile": str(best[1]), "ms": best[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tune_ffn(arch: int, quick: bool) -> list[dict]:
    from . import feed_forward as F

    rows = []
    for (kernel, dc, align, size, a), builtin in sorted(C.FFN.items()):
        if a != arch or (quick and align != "aligned"):
            continue
        torch.backends.cuda.matmul.allow_tf32 = dc == "tf32"
        t = 64 if size == "small" else 8192
        d, f = (1024, 4096) if align == "aligned" else (1000, 4000)
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(t, d, device="cuda", dtype=_dtype(dc), generator=g)
        w1 = torch.randn(f, d, device="cuda", dtype=x.dtype, generator=g) / d ** 0.5
        w2 = torch.randn(d, f, device="cuda", dtype=x.dtype, generator=g) / f ** 0.5
        go = torch.randn(t, d, device="cuda", dtype=x.dtype, generator=g)
        act = "relu" if kernel == "prologue" else "gelu"
        out, saved = F.ffn_forward(x, w1, None, w2, None, act, 0.0, None, True)
        if kernel == "up":
            def run():
                F.ffn_forward(x, w1, None, w2, None, act, 0.0, None, True)
        else:
            def run():
                F.ffn_backward(go, x, w1, None, w2, None, saved, act, 0.0, None,
                               h_in_prologue=kernel == "prologue")
        key = (kernel, dc, align, size, a)
        best = (math.inf, builtin)
        for text in FFN_CANDIDATES["f16" if dc == "f16" else "f32"]:
            tile = C.parse(text)
            if kernel in ("up", "dh"):
                tile = C.Tile(tile.block_m, tile.block_n, tile.num_warps, tile.num_stages, tile.block_k,
                              2 if tile.block_n >= 128 else 1)
            if kernel == "dh" and tile.block_m % F.DB1_ROWS:
                continue
            C.FFN[key] = tile
            best = min(best, (_time(run), tile), key=lambda x: x[0])
        C.FFN[key] = best[1]
        rows.append({"key": list(key), "tile": str(best[1]), "ms": best[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSON table to write")
    p.add_argument("--family", choices=("attention", "ffn", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="head dim 64 / aligned keys only")
    a = p.parse_args(argv)
    if C.INTERPRET or not torch.cuda.is_available():
        print("fastattn.kernels.tune: needs a CUDA GPU and TRITON_INTERPRET unset (it times real launches)",
              file=sys.stderr)
        return 2
    arch = C.device_arch(torch.device("cuda"))
    rows = []
    if a.family in ("attention", "all"):
        rows += tune_attention(arch, a.quick)
    if a.family in ("ffn", "all"):
        rows += tune_ffn(arch, a.quick)
    with open(a.out, "w") as f:
        json.dump(rows, f, indent=0)
    print(f"{len(rows)} keys tuned for sm_{arch} family; use FASTATTN_TRITON_CONFIGS={a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
