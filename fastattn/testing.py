"""Numerical checks shared by the tests and the benchmarks.

The bound, as flash-attention's tests use it: compute the reference in float64 and PyTorch's own
result in the tested dtype; a kernel's output passes when
    max|out - ref64| <= 2 * max|torch_same_dtype - ref64| + floor(dtype).
A failure says where the largest error is and how large it is.
"""
from __future__ import annotations

import torch

FLOORS = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def error_floor(dtype: torch.dtype) -> float:
    return FLOORS[dtype]


def check_bound(name: str, out: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor,
                floor: float | None = None, factor: float = 2.0) -> None:
    """Raise AssertionError unless out is within factor x PyTorch's own error (+ floor) of ref64."""
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if floor is None:
        floor = error_floor(out.dtype)
    out64 = out.detach().to(torch.float64).cpu()
    ref = ref64.detach().to(torch.float64).cpu()
    torch_err = (same_dtype.detach().to(torch.float64).cpu() - ref).abs().max().item() if ref.numel() else 0.0
    if not torch.isfinite(out64).all():
        bad = (~torch.isfinite(out64)).nonzero()[0].tolist()
        raise AssertionError(f"{name}: non-finite value at index {bad}: {out64[tuple(bad)].item()}")
    err = (out64 - ref).abs()
    worst = err.max().item() if err.numel() else 0.0
    bound = factor * torch_err + floor
    if worst > bound:
        idx = tuple(int(i) for i in (err == err.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: max |out - ref| = {worst:.3e} at index {idx} (out {out64[idx].item():.6g}, "
            f"ref {ref[idx].item():.6g}) exceeds bound {bound:.3e} = {factor} x torch's own error "
            f"{torch_err:.3e} + floor {floor:.1e} ({(err > bound).sum().item()} of {err.numel()} elements over)")
