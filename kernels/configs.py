"""Tile configurations of every Triton kernel of fastattn (attention and feed-forward): one mechanism.

A launch picks its tile by a table lookup, never by timing: the key is
    (kernel, dtype class, size class, specialisation, arch family)
and the answer is one Tile (block sizes, warps, stages). The same inputs pick the same tile in every
process, so results are bitwise reproducible across processes, and nothing is measured inside an op
(a first call during CUDA-graph capture is safe).

  * dtype class (both families): "f16" (float16 and bfloat16), "f32" (float32 computed in true fp32,
    tl.dot input_precision="ieee"), "tf32" (float32 with torch.backends.cuda.matmul.allow_tf32).
  * size class: attention, the padded head dim (32, 64, 128, 256; head_dim_bucket) and, for the
    forward only, the sequence bucket (max(L, S) <= 512: "short", else "long"); feed-forward, the
    operand alignment ("aligned": every address-forming size a multiple of 16 and 16-byte pointers,
    which triton vectorises; else "unaligned") and the output size ("small": a side under 128,
    else "large").
  * specialisation: attention, the compile-time flags' name ("plain", "mask", "drop", "mask+drop";
    key padding and causality are runtime flags); feed-forward, the kernel's role.
  * arch family: 80 (sm_80..sm_89) or 90 (sm_90 and later).

Every tile a table can return is compiled ahead of time for sm_80 and sm_90 with triton 3.6 and 3.9
by tests/test_triton_aot.py (no spills, shared memory within the chip): that test is the record of
why an entry is what it is. A tuning run on a GPU (python -m fastattn.kernels.tune) times the
candidates of each key and writes a JSON table; pointing FASTATTN_TRITON_CONFIGS at that file (read
once, at import) overrides the built-in entries it names.
Under TRITON_INTERPRET=1 (read once, at import) every kernel uses one small tile.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_version() -> str:
    """'major.minor' of the triton this process imports ('' without triton)."""
    try:
        import triton
    except ImportError:
        return ""
    return ".".join(triton.__version__.split(".")[:2])


TRITON_VERSION = _triton_version()
OVERRIDE_FILE = os.environ.get("FASTATTN_TRITON_CONFIGS") or None  # read once, here

ARCH_FAMILIES = (80, 90)
DTYPE_CLASSES = ("f16", "f32", "tf32")


@dataclass(frozen=True)
class Tile:
    """One launch configuration: block sizes (BLOCK_M, BLOCK_N[, BLOCK_K, EPI_SPLIT]), warps, stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    block_k: int = 0      # feed-forward GEMM tiles only
    epi_split: int = 0    # feed-forward epilogue kernels only (up, dh)
    precision: str = ""   # attention: tl.dot input_precision for this tile ("": the dtype class's)

    @property
    def kwargs(self) -> dict:
        kw = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}
        if self.block_k:
            kw.update(BLOCK_K=self.block_k, GROUP_M=8)
        if self.epi_split:
            kw["EPI_SPLIT"] = self.epi_split
        return kw

    def __str__(self) -> str:
        s = f"{self.block_m}x{self.block_n}" + (f"x{self.block_k}" if self.block_k else "")
        s += f" w{self.num_warps} s{self.num_stages}" + (f" split{self.epi_split}" if self.epi_split else "")
        return s + (f" {self.precision}" if self.precision else "")


def parse(text: str) -> Tile:
    """'64x32 w8 s2' (attention; a trailing 'ieee' forces true-fp32 products) or '128x128x64 w8 s4 split2'
    (feed-forward) -> Tile."""
    parts = text.split()
    precision = parts.pop() if parts[-1] in ("ieee", "tf32") else ""
    dims = [int(x) for x in parts[0].split("x")]
    opts = {}
    for p in parts[1:]:
        name = "split" if p.startswith("split") else p[0]
        opts[name] = int(p[len(name):])
    return Tile(dims[0], dims[1], opts["w"], opts["s"], dims[2] if len(dims) > 2 else 0, opts.get("split", 0),
                precision)


def dtype_class(dtype: torch.dtype, allow_tf32: bool | None = None) -> str:
    """The dtype class of an input dtype; allow_tf32 defaults to torch.backends.cuda.matmul.allow_tf32."""
    if dtype in (torch.float16, torch.bfloat16):
        return "f16"
    if dtype == torch.float32:
        if allow_tf32 is None:
            allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        return "tf32" if allow_tf32 else "f32"
    raise TypeError(f"fastattn: argument 'dtype' got {dtype}; expected float16, bfloat16 or float32")


def input_precision(dc: str) -> str:
    """tl.dot's input_precision for a dtype class (ignored for 16-bit operands)."""
    return "ieee" if dc == "f32" else "tf32"


def arch_family(cc: int) -> int:
    """80 for sm_80..sm_89, 90 for sm_90 and later (cc as 10 * major + minor)."""
    return 90 if cc >= 90 else 80


def device_arch(device: torch.device) -> int:
    """The arch family of a CUDA device (asked at launch, never at import)."""
    major, minor = torch.cuda.get_device_capability(device)
    return arch_family(10 * major + minor)


# ==================================================================================================
# Attention: (kernel, dtype class, head-dim bucket) -> {specialisation: tile on sm_80 | tile on sm_90}
# ==================================================================================================
HEAD_DIM_BUCKETS = (32, 64, 128, 256)
SEQ_BUCKETS = ("short", "long")
SHORT_SEQ = 512
ATTN_KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
VARIANTS = ("plain", "mask", "drop", "mask+drop")

# "A | B": A on sm_80, B on sm_90; one tile serves both. BLOCK_M is the query block, BLOCK_N the key
# block (dK/dV: BLOCK_N keys stay resident while BLOCK_M query rows stream past).
_ATTN = {
    # forward
    ("fwd", "f16", 32): dict(plain="64x64 w4 s3", mask="64x64 w8 s2", drop="64x64 w8 s2", mask_drop="64x32 w8 s2"),
    ("fwd", "f16", 64): dict(plain="64x64 w4 s3", mask="64x64 w8 s2", drop="64x64 w8 s2", mask_drop="64x32 w8 s2 | 64x64 w8 s2"),
    ("fwd", "f16", 128): dict(plain="64x64 w8 s3", mask="64x32 w8 s2", drop="64x32 w8 s2", mask_drop="64x32 w8 s2"),
    ("fwd", "f16", 256): dict(plain="64x32 w8 s2", mask="64x32 w8 s2 | 32x32 w8 s2", drop="32x32 w8 s1 | 32x32 w8 s2", mask_drop="32x32 w8 s2"),
    ("fwd", "f32", 32): dict(plain="16x32 w4 s2", mask="32x32 w8 s1", drop="16x32 w4 s2", mask_drop="16x32 w8 s2"),
    ("fwd", "f32", 64): dict(plain="16x32 w4 s2", mask="32x32 w8 s1", drop="16x32 w4 s2", mask_drop="16x32 w8 s2"),
    ("fwd", "f32", 128): dict(plain="16x32 w8 s2", mask="16x32 w8 s2", drop="16x32 w8 s2", mask_drop="16x32 w4 s2 | 16x32 w8 s2"),
    ("fwd", "f32", 256): dict(plain="16x32 w8 s2", mask="32x16 w8 s2", drop="32x16 w8 s2", mask_drop="16x32 w8 s2"),
    ("fwd", "tf32", 32): dict(plain="32x32 w8 s2", mask="32x32 w8 s2", drop="32x32 w4 s2 | 32x32 w8 s2", mask_drop="32x32 w8 s2"),
    ("fwd", "tf32", 64): dict(plain="32x32 w8 s2", mask="32x32 w4 s2 | 32x32 w8 s1", drop="32x32 w8 s2", mask_drop="32x32 w8 s2"),
    ("fwd", "tf32", 128): dict(plain="32x32 w8 s2", mask="32x32 w4 s2", drop="32x32 w8 s2 | 32x32 w4 s2", mask_drop="32x32 w8 s2 | 32x32 w8 s1"),
    ("fwd", "tf32", 256): dict(plain="16x32 w8 s2 | 32x32 w8 s1", mask="32x32 w8 s1 | 16x32 w8 s2", drop="16x32 w8 s2", mask_drop="32x32 w8 s1"),
    # dK/dV: one pipeline stage (with more, the prefetched q/dO tiles stay in registers), except where
    # two compile in fewer registers: f16 hd256 mask+drop on sm_80 (the only tile tried that is clean on
    # triton 3.6 and 3.9) and tf32 hd256 mask+drop on sm_90
    ("bwd_dkdv", "f16", 32): dict(plain="16x32 w8 s1 | 32x32 w8 s1", mask="32x32 w8 s1", drop="16x32 w4 s1 | 16x32 w8 s1", mask_drop="16x32 w4 s1 | 16x32 w8 s1"),
    ("bwd_dkdv", "f16", 64): dict(plain="16x32 w8 s1", mask="16x32 w8 s1", drop="16x32 w4 s1 | 16x32 w8 s1", mask_drop="32x32 w8 s1 | 16x32 w8 s1"),
    ("bwd_dkdv", "f16", 128): dict(plain="32x32 w8 s1 | 32x32 w4 s1", mask="32x32 w8 s1", drop="16x32 w8 s1", mask_drop="16x16 w8 s1 | 16x32 w8 s1"),
    ("bwd_dkdv", "f16", 256): dict(plain="16x32 w8 s1", mask="32x16 w8 s1 | 16x16 w8 s1", drop="16x16 w8 s1", mask_drop="16x16 w8 s2 | 16x16 w8 s1"),
    ("bwd_dkdv", "f32", 32): dict(plain="16x32 w8 s1 | 16x32 w4 s1", mask="16x32 w8 s1 | 32x16 w4 s1", drop="16x16 w4 s1 | 32x16 w8 s1", mask_drop="16x16 w4 s1 | 16x16 w8 s2"),
    ("bwd_dkdv", "f32", 64): dict(plain="16x16 w8 s1 | 16x32 w8 s1", mask="16x32 w8 s1", drop="16x32 w8 s1 | 16x32 w4 s1", mask_drop="16x16 w8 s1 | 16x16 w4 s1"),
    ("bwd_dkdv", "f32", 128): dict(plain="16x16 w2 s1 | 16x32 w8 s1", mask="32x16 w8 s1 | 16x16 w8 s1", drop="32x16 w4 s1 | 16x16 w8 s1", mask_drop="16x16 w8 s1"),
    ("bwd_dkdv", "f32", 256): dict(plain="16x16 w4 s1 | 16x32 w8 s1", mask="32x16 w8 s1", drop="16x16 w4 s1 | 16x32 w8 s1", mask_drop="16x16 w4 s1"),
    ("bwd_dkdv", "tf32", 32): dict(plain="16x32 w8 s1", mask="16x32 w8 s1", drop="16x32 w8 s1", mask_drop="16x32 w8 s1 | 16x16 w8 s1"),
    ("bwd_dkdv", "tf32", 64): dict(plain="16x32 w8 s1", mask="32x32 w8 s1", drop="16x32 w8 s1", mask_drop="16x16 w8 s1 | 16x32 w8 s1"),
    ("bwd_dkdv", "tf32", 128): dict(plain="16x32 w8 s1 | 16x32 w4 s1", mask="16x32 w8 s1", drop="16x16 w4 s1", mask_drop="16x16 w8 s1"),
    ("bwd_dkdv", "tf32", 256): dict(plain="16x16 w8 s1", mask="16x16 w8 s1", drop="16x16 w8 s1", mask_drop="16x16 w8 s1 | 16x16 w8 s2"),
    # dQ
    ("bwd_dq", "f16", 32): dict(plain="64x32 w8 s2", mask="32x32 w4 s2", drop="32x32 w8 s2", mask_drop="32x32 w4 s2"),
    ("bwd_dq", "f16", 64): dict(plain="64x32 w8 s2", mask="32x32 w4 s2", drop="32x32 w4 s2 | 32x32 w8 s2", mask_drop="32x32 w4 s2"),
    ("bwd_dq", "f16", 128): dict(plain="64x32 w8 s2", mask="64x32 w8 s2", drop="32x32 w8 s2 | 32x32 w8 s1", mask_drop="32x32 w8 s2 | 32x32 w8 s1"),
    ("bwd_dq", "f16", 256): dict(plain="32x32 w8 s2", mask="32x32 w8 s2", drop="32x32 w8 s2 | 32x16 w8 s2", mask_drop="32x32 w8 s2"),
    ("bwd_dq", "f32", 32): dict(plain="32x32 w8 s2", mask="16x32 w8 s1 | 32x32 w8 s2", drop="32x32 w8 s2 | 16x32 w8 s2", mask_drop="16x32 w8 s1"),
    ("bwd_dq", "f32", 64): dict(plain="64x32 w8 s2 | 32x32 w8 s2", mask="32x32 w4 s2 | 32x32 w8 s2", drop="16x32 w8 s2 | 16x32 w4 s2", mask_drop="32x32 w8 s2"),
    ("bwd_dq", "f32", 128): dict(plain="16x32 w8 s1 | 16x32 w8 s2", mask="16x32 w8 s2", drop="16x32 w8 s2 | 16x32 w4 s2", mask_drop="32x16 w8 s2 | 16x32 w8 s1"),
    ("bwd_dq", "f32", 256): dict(plain="16x32 w8 s1", mask="16x32 w8 s1", drop="16x32 w8 s1", mask_drop="16x32 w8 s1"),
    ("bwd_dq", "tf32", 32): dict(plain="16x32 w4 s2 | 16x32 w8 s2", mask="16x32 w8 s2", drop="16x32 w8 s2", mask_drop="16x32 w8 s2"),
    ("bwd_dq", "tf32", 64): dict(plain="32x32 w8 s2", mask="16x32 w8 s2", drop="32x32 w8 s2", mask_drop="32x32 w8 s2"),
    ("bwd_dq", "tf32", 128): dict(plain="32x32 w8 s2", mask="16x32 w4 s2 | 16x32 w8 s2", drop="16x32 w4 s2 | 32x32 w8 s2", mask_drop="32x32 w8 s2"),
    ("bwd_dq", "tf32", 256): dict(plain="16x32 w8 s1", mask="16x32 w8 s1", drop="16x32 w8 s1", mask_drop="16x32 w8 s1"),
}
# Long sequences (max(L, S) > SHORT_SEQ), forward, 16-bit, no mask or dropout: bigger query blocks.
_ATTN_LONG = {
    ("fwd", "f16", 32, "plain"): "128x64 w4 s3",
    ("fwd", "f16", 64, "plain"): "128x64 w8 s3",
    ("fwd", "f16", 128, "plain"): "128x32 w8 s3",
}
# The backward's delta pre-pass (memory bound): BLOCK_M only, per dtype class (every head dim,
# variant, arch family). Its rare split-row recompute (|lse| >= SPLIT_LSE) runs on the block's rows,
# and ptxas gives that loop a small stack frame at 4 warps and 32 or 64 rows (triton 3.6 or 3.9),
# and for fp32 at 16 rows x 4 warps (3.6: hd64 plain, hd256 mask+drop, sm_90), 16 x 8 (hd64 drop,
# sm_80) or 16 x 2 (3.9: hd64 mask+drop, sm_90). Every row below compiles without one on 3.6 and
# 3.9, sm_80 and sm_90, bf16 too (measured 2026-11-30, issue 13).
# Keys whose tile depends on the triton version: no tile tried compiles without a stack frame on both
# 3.6 (the GPU machines') and 3.9, so each version gets the tile that is clean with it (the entry in
# _ATTN is 3.9's). dK/dV hd256 fp32 with mask and dropout on sm_80 (k, v, dK, dV resident, 256 wide):
# 3.6 spills 32 B at 255 registers with 3.9's 16x16 w4 (f32) / w8 (tf32); 16x16 w8 is clean on 3.6 in
# true fp32, and the tf32 key takes those same ieee products there (tf32 is a permission, never a
# requirement: the result is at least as accurate), since no tf32 tile was clean on 3.6
# (tests/test_triton_aot.py has the tiles tried).
_ATTN_BY_TRITON = {
    "3.6": {("bwd_dkdv", "f32", 256, "mask+drop", 80): "16x16 w8 s1",
            ("bwd_dkdv", "tf32", 256, "mask+drop", 80): "16x16 w8 s1 ieee"},
}
ATTN_DELTA = Tile(16, 0, 4, 1)
ATTN_DELTA_BY_CLASS = {"f32": Tile(32, 0, 8, 1)}
INTERPRET_ATTN = Tile(16, 16, 1, 1)
INTERPRET_ATTN_DELTA = Tile(16, 0, 1, 1)


def _per_arch(text: str) -> dict:
    parts = [parse(p) for p in text.split("|")]
    return dict(zip(ARCH_FAMILIES, parts if len(parts) == 2 else parts * 2))


def variant(has_mask: bool, has_dropout: bool) -> str:
    return "+".join(n for n, on in (("mask", has_mask), ("drop", has_dropout)) if on) or "plain"


def seq_bucket(l: int, s: int) -> str:
    return "short" if max(l, s) <= SHORT_SEQ else "long"


def head_dim_bucket(e: int) -> int:
    """The padded head dim of a head dim 1..256: the next power of two, at least 32 (1..16 share the
    32 bucket: one bucket fewer to compile, at twice the multiply work of a 16-wide tile)."""
    assert 1 <= e <= 256, e
    return max(32, 1 << (e - 1).bit_length())


def attention_table() -> dict:
    """{(kernel, dtype class, head-dim bucket, seq bucket, variant, arch family): Tile} for every key."""
    table = {}
    for (kernel, dc, hd), by_var in _ATTN.items():
        for var_key, text in by_var.items():
            var = var_key.replace("_", "+")
            tiles = _per_arch(text)
            for sq in SEQ_BUCKETS:
                long_text = _ATTN_LONG.get((kernel, dc, hd, var)) if sq == "long" else None
                for arch in ARCH_FAMILIES:
                    table[kernel, dc, hd, sq, var, arch] = _per_arch(long_text)[arch] if long_text else tiles[arch]
    for (kernel, dc, hd, var, arch), text in _ATTN_BY_TRITON.get(TRITON_VERSION, {}).items():
        for sq in SEQ_BUCKETS:
            table[kernel, dc, hd, sq, var, arch] = parse(text)
    return table


def _load_overrides() -> dict:
    if not OVERRIDE_FILE:
        return {}
    with open(OVERRIDE_FILE) as f:
        rows = json.load(f)
    return {tuple(r["key"]): parse(r["tile"]) for r in rows}


ATTENTION = attention_table()
FFN_OVERRIDES = {}
for _key, _tile in _load_overrides().items():  # keys as written by fastattn.kernels.tune
    if _key[0] in ATTN_KERNELS:
        ATTENTION[_key] = _tile
    else:
        FFN_OVERRIDES[_key] = _tile


def delta_tile(dc: str) -> Tile:
    """The delta pre-pass's tile for dtype class dc (every head dim, variant and arch family)."""
    return ATTN_DELTA_BY_CLASS.get(dc, ATTN_DELTA)


def attention_config(kernel: str, dc: str, hd: int, seq: str, var: str, arch: int) -> Tile:
    """The tile of one attention launch (kernel "fwd", "bwd_dkdv", "bwd_dq" or "bwd_delta")."""
    if INTERPRET:
        return INTERPRET_ATTN_DELTA if kernel == "bwd_delta" else INTERPRET_ATTN
    if kernel == "bwd_delta":
        return delta_tile(dc)
    return ATTENTION[kernel, dc, hd, seq, var, arch]


# ==================================================================================================
# Feed-forward: (kernel, dtype class, alignment, size) -> tile on sm_80 | tile on sm_90
# ==================================================================================================
FFN_KERNELS = ("up", "dh", "linear", "prologue")   # prologue: dW2 with H recomputed (16-bit only)
ALIGNMENTS = ("aligned", "unaligned")
FFN_SIZES = ("small", "large")
_FFN = {
    # up (x @ w1^T + act/dropout epilogue) and dH (dOut @ w2 + act'/dropout epilogue): the epilogue on a
    # full 128-wide tile held by 8 warps spills, so it runs on column halves (split2).
    ("up", "f16", "aligned"): dict(small="64x64x64 w4 s3 split1", large="128x128x32 w8 s3 split2"),
    ("up", "f16", "unaligned"): dict(small="64x64x32 w8 s3 split2", large="64x64x32 w8 s3 split2"),
    ("dh", "f16", "aligned"): dict(small="64x64x64 w4 s3 split1", large="128x64x64 w8 s3 split2"),
    ("dh", "f16", "unaligned"): dict(small="64x64x32 w8 s3 split2", large="64x64x32 w8 s3 split2"),
    ("linear", "f16", "aligned"): dict(small="64x64x64 w4 s3", large="128x128x64 w8 s4"),
    ("linear", "f16", "unaligned"): dict(small="64x64x32 w4 s3", large="64x64x32 w4 s3"),
    ("prologue", "f16", "aligned"): dict(small="64x64x64 w4 s3", large="128x128x64 w8 s4"),
    ("prologue", "f16", "unaligned"): dict(small="64x64x32 w4 s3", large="64x64x32 w4 s3"),
    # fp32 (ieee or tf32): 8 warps (with 4, 64x64x32 sits at 255 registers)
    ("up", "f32", "aligned"): dict(small="64x64x32 w8 s3 split1", large="64x64x32 w8 s3 split1"),
    ("up", "f32", "unaligned"): dict(small="64x64x32 w8 s3 split1", large="64x64x32 w8 s3 split1"),
    ("dh", "f32", "aligned"): dict(small="64x64x32 w8 s3 split1", large="64x64x32 w8 s3 split1"),
    ("dh", "f32", "unaligned"): dict(small="64x64x32 w8 s3 split1", large="64x64x32 w8 s3 split1"),
    ("linear", "f32", "aligned"): dict(small="128x64x32 w8 s3", large="128x64x32 w8 s3"),
    ("linear", "f32", "unaligned"): dict(small="64x64x32 w8 s3", large="64x64x32 w8 s3"),
}
INTERPRET_FFN = Tile(32, 32, 4, 1, 32, 2)


def ffn_table() -> dict:
    """{(kernel, dtype class, alignment, size, arch family): Tile}; f32 and tf32 share the f32 rows."""
    table = {}
    for (kernel, dcg, align), by_size in _FFN.items():
        for size, text in by_size.items():
            for dc in (("f16",) if dcg == "f16" else ("f32", "tf32")):
                for arch, tile in _per_arch(text).items():
                    table[kernel, dc, align, size, arch] = tile
    table.update(FFN_OVERRIDES)
    return table


FFN = ffn_table()


def ffn_size(m: int, n: int) -> str:
    return "small" if min(m, n) < 128 else "large"


def ffn_config(kernel: str, dc: str, align: str, m: int, n: int, arch: int) -> Tile:
    """The tile of one feed-forward GEMM launch computing an (m, n) output."""
    if INTERPRET:
        return INTERPRET_FFN if kernel in ("up", "dh") else Tile(32, 32, 4, 1, 32)
    return FFN[kernel, dc, align, ffn_size(m, n), arch]
