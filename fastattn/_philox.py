"""The one dropout random stream every backend shares.

A dropout decision for element number ``offset`` (an int64 counter, see below) under seed ``seed``
(a 64-bit integer) is ``uniform(seed, offset) >= p``: keep, and scale by ``1 / (1 - p)``.
``uniform`` is Philox-4x32-10 exactly as Triton's ``tl.rand(seed, offset)`` computes it:

    counter = (lo32(offset), hi32(offset), 0, 0), key = (lo32(seed), hi32(seed))
    10 rounds; the first output word w is read as int32 x; x = ~x if x < 0;
    uniform = float32(x) * float32(4.6566127342e-10)

Counters: attention element (b, h, i, j) of an (N, Hq, L, S) problem uses
``offset + ((b * Hq + h) * L + i) * S + j``; feed-forward hidden element (t, f) of a (T, F) hidden uses
``offset + t * F + f``. ``offset`` is 0 for a seed drawn on the CPU (a (1,) seed tensor); on CUDA the
seed tensor is (2,) ``(seed, offset)`` on the device, drawn from the device's CUDA generator (see
``new_seed``), and the kernels read both values on the device, so CUDA-graph replays draw fresh masks. Because the counter depends only on the element's coordinates, forward and
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


def seed_and_offset(seed) -> tuple[int, int]:
    """(seed, counter offset) of a seed given as an int, a (1,) tensor (offset 0) or a (2,) tensor."""
    if not isinstance(seed, torch.Tensor):
        return int(seed), 0
    vals = seed.reshape(-1).tolist()
    if len(vals) not in (1, 2):
        raise ValueError(f"fastattn: argument 'seed' got a tensor of shape {tuple(seed.shape)}; expected (1,) seed "
                         "or (2,) (seed, counter offset)")
    return int(vals[0]), int(vals[1]) if len(vals) == 2 else 0


@torch.library.custom_op("fastattn::philox_keep_mask", mutates_args=())
def _keep_mask_op(seed: torch.Tensor, p: float, shape: list[int], device: torch.device) -> torch.Tensor:
    # An opaque op, so that torch.compile of the reference path does not fuse 10 Philox rounds into
    # one enormous pointwise kernel (inductor takes minutes on that); counters are offset + 0 .. numel-1.
    numel = 1
    for size in shape:
        numel *= size
    seed_v, offset = seed_and_offset(seed)
    off = torch.arange(numel, dtype=torch.int64, device=device).view(shape) + offset
    return keep_mask(seed_v, off, p)


@_keep_mask_op.register_fake
def _(seed, p, shape, device):
    return torch.empty(shape, dtype=torch.bool, device=device)


def _seed_tensor(seed) -> torch.Tensor:
    return seed if isinstance(seed, torch.Tensor) else torch.tensor([int(seed)], dtype=torch.int64)


def attention_keep_mask(seed, p: float, n: int, h: int, l: int, s: int, device=None) -> torch.Tensor:
    """(n, h, l, s) bool keep mask of attention dropout; seed an int, or the int64 seed tensor: (1,) seed
    or (2,) (seed, counter offset), on any device."""
    return _keep_mask_op(_seed_tensor(seed), float(p), [n, h, l, s], torch.device(device or "cpu"))


def ffn_keep_mask(seed, p: float, t: int, f: int, device=None) -> torch.Tensor:
    """(t, f) bool keep mask of feed-forward hidden dropout; seed as for attention_keep_mask."""
    return _keep_mask_op(_seed_tensor(seed), float(p), [t, f], torch.device(device or "cpu"))


def new_seed(device=None, count: int = 1) -> torch.Tensor:
    """A fresh dropout key for a call on `device` that uses counters 0 .. count-1 (the mask's numel).

    CPU (or no device): a seed drawn from torch's default CPU generator, an int64 CPU tensor (1,)
    (counter offset 0): torch.manual_seed(...) reproduces every mask, bit-identical to before.
    CUDA: an int64 (2,) tensor (seed, offset) on the device, from that device's default CUDA
    generator (torch.manual_seed / torch.cuda.manual_seed reproduce it), whose offset advances by
    `count` rounded up to 4, so consecutive calls draw disjoint counters. With fastattn._C it is
    written on the device by torch.ops.fastattn.cuda_philox_seed from the generator's
    philox_cuda_state: capture-safe, each CUDA-graph replay reads that replay's state. Without
    _C, a host fallback reads and advances the generator (not capture-safe; refused during capture).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type != "cuda":
        return torch.randint(0, 2**62, (1,), dtype=torch.int64)
    increment = _increment(count)
    op = _cuda_seed_op()
    if op is not None:
        return op(torch.empty(0, device=device), increment)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fastattn: dropout during CUDA-graph capture needs fastattn._C with its CUDA kernels "
                           "(torch.ops.fastattn.cuda_philox_seed); without it the seed would be frozen into the graph")
    index = device.index if device.index is not None else torch.cuda.current_device()
    seed, offset = draw_from_generator(torch.cuda.default_generators[index], increment)
    return _key_tensor([seed, offset], device)


def _key_tensor(vals, device) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.int64, device=device)


def _increment(count: int) -> int:
    count = max(int(count), 1)
    return (count + 3) // 4 * 4  # torch's philox_cuda_state wants multiples of 4


def draw_from_generator(gen, increment: int) -> tuple[int, int]:
    """(seed, offset) of a CUDA generator, advancing its Philox offset by `increment` — what
    philox_cuda_state(increment) returns outside graph capture; the host fallback of new_seed."""
    seed = int(gen.initial_seed())
    offset = int(gen.get_offset())
    gen.set_offset(offset + int(increment))
    return seed, offset


# torch.ops.fastattn.cuda_philox_seed(like, increment) -> int64 (2,) (Philox seed, counter offset) of
# the default CUDA generator of like's device, on that device; the generator's offset advances by
# `increment` (a positive multiple of 4). The schema is written here; fastattn._C implements it for
# CUDA (csrc/cuda/cuda_ops.cpp, philox_seed.cu). Tagged nondeterministic_seeded, so that graph passes
# never merge two draws; its fake kernel lets torch.compile trace it.
_LIB = torch.library.Library("fastattn", "FRAGMENT")
try:
    _LIB.define("cuda_philox_seed(Tensor like, int increment) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,))

    @torch.library.register_fake("fastattn::cuda_philox_seed", lib=_LIB)
    def _cuda_seed_fake(like, increment):
        return torch.empty(2, dtype=torch.int64, device=like.device)
except RuntimeError:  # this file loaded a second time (by path, in a test): defined already
    pass

_CUDA_SEED_OP = None  # the op once it has a CUDA kernel; False forces the host fallback (tests)


def _cuda_seed_op():
    if _CUDA_SEED_OP is None:
        setup_cuda_seed_op()
    return _CUDA_SEED_OP or None


def setup_cuda_seed_op() -> bool:
    """Whether torch.ops.fastattn.cuda_philox_seed has a CUDA kernel (fastattn._C built with CUDA and
    loaded); call once after fastattn._C is loaded, so that torch.compile never traces the lookup."""
    global _CUDA_SEED_OP
    if _CUDA_SEED_OP:
        return True
    try:
        ok = torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::cuda_philox_seed", "CUDA")
    except RuntimeError:
        ok = False
    if ok:
        _CUDA_SEED_OP = torch.ops.fastattn.cuda_philox_seed.default
    return ok
