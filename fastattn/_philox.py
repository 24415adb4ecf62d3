"""The one dropout random stream every backend shares.

A dropout decision for element number ``offset`` (an int64 counter, see below) under seed ``seed``
(a 64-bit integer) is ``uniform(seed, offset) >= p``: keep, and scale by ``1 / (1 - p)``.
``uniform`` is Philox-4x32-10 exactly as Triton's ``tl.rand(seed, offset)`` computes it:

    counter = (lo32(offset), hi32(offset), 0, 0), key = (lo32(seed), hi32(seed))
    10 rounds; the first output word w is read as int32 x; x = ~x if x < 0;
    uniform = float32(x) * float32(4.6566127342e-10)

Counters: attention element (b, h, i, j) of an (N, Hq, L, S) problem uses
``((b * Hq + h) * L + i) * S + j``; feed-forward hidden element (t, f) of a (T, F) hidden uses
``t * F + f``. Because the counter depends only on the element's coordinates, forward and
backward regenerate the same mask whatever their tiling, and every backend (reference, cpu,
triton, cuda) draws the same mask from the same seed. csrc/philox.h is the C++/CUDA twin.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b holds uint32 values in int64; the 64-bit product of two uint32 can overflow int64's sign
    # but wraps consistently, so split it into hi/lo through 16-bit limbs to stay exact.
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
    hi = ((p_hi + (p_lo >> 16)) >> 16) & _M32
    return hi, lo


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """uniform [0, 1) float32 for every int64 counter in ``offsets`` (same shape), matching tl.rand."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & _M32
    c1 = (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    x = c0.to(torch.int32)  # wraps to the signed reading of the uint32
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def keep_mask(seed: int, offsets: torch.Tensor, p: float) -> torch.Tensor:
    """bool keep mask for dropout probability p (True = keep)."""
    return philox_uniform(seed, offsets) >= p


@torch.library.custom_op("fastattn::philox_keep_mask", mutates_args=())
def _keep_mask_op(seed: torch.Tensor, p: float, shape: list[int], device: torch.device) -> torch.Tensor:
    # An opaque op, so that torch.compile of the reference path does not fuse 10 Philox rounds into
    # one enormous pointwise kernel (inductor takes minutes on that); counters are 0 .. numel-1.
    numel = 1
    for size in shape:
        numel *= size
    off = torch.arange(numel, dtype=torch.int64, device=device).view(shape)
    return keep_mask(int(seed.reshape(-1)[0]), off, p)


@_keep_mask_op.register_fake
def _(seed, p, shape, device):
    return torch.empty(shape, dtype=torch.bool, device=device)


def _seed_tensor(seed) -> torch.Tensor:
    return seed if isinstance(seed, torch.Tensor) else torch.tensor([int(seed)], dtype=torch.int64)


def attention_keep_mask(seed, p: float, n: int, h: int, l: int, s: int, device=None) -> torch.Tensor:
    """(n, h, l, s) bool keep mask of attention dropout; seed an int or the (1,) int64 seed tensor."""
    return _keep_mask_op(_seed_tensor(seed), float(p), [n, h, l, s], torch.device(device or "cpu"))


def ffn_keep_mask(seed, p: float, t: int, f: int, device=None) -> torch.Tensor:
    """(t, f) bool keep mask of feed-forward hidden dropout; seed an int or the (1,) int64 seed tensor."""
    return _keep_mask_op(_seed_tensor(seed), float(p), [t, f], torch.device(device or "cpu"))


def new_seed() -> torch.Tensor:
    """A fresh seed drawn from torch's default CPU generator: an int64 CPU tensor of shape (1,).

    torch.manual_seed(...) therefore reproduces every dropout mask."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)
