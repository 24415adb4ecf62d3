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


# Benchmarks compare fastattn with a peer that is itself approximate (torch in the same dtype), so
# they check a relative L2 error instead of the float64 bound: loose enough for two valid roundings.
RELATIVE_L2 = {torch.float64: 1e-6, torch.float32: 2e-3, torch.bfloat16: 5e-2, torch.float16: 3e-2}


def check_relative(what: str, got, want, dtype: torch.dtype) -> None:
    """Each tensor of ``got`` within RELATIVE_L2[dtype] of ``want`` (relative L2); None pairs skip."""
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    assert len(got) == len(want), f"{what}: got {len(got)} tensors, expected {len(want)}"
    tol = RELATIVE_L2[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None and g is None:
            continue
        assert g is not None and w is not None, f"{what}: tensor {i} is None on one side only"
        assert g.shape == w.shape, f"{what}: tensor {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
        assert torch.isfinite(g64).all(), f"{what}: tensor {i} has non-finite values"
        err = (g64 - w64).norm().item() / max(w64.norm().item(), 1e-30)
        assert err <= tol, f"{what}: tensor {i} relative L2 error {err:.3g} > {tol:g} (dtype {dtype})"


# Two implementations of one computation in the same dtype (a fastattn module against the torch
# module it replaces, a compiled graph against eager): they may differ only by rounding order.
PEER_TOLERANCE = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-2, 5e-2),
                  torch.float16: (5e-3, 5e-3)}


def check_peer(what: str, got: torch.Tensor, want: torch.Tensor, atol: float | None = None,
               rtol: float | None = None) -> None:
    """got == want up to PEER_TOLERANCE[dtype] (absolute, relative), or the atol/rtol a test states
    for a longer chain of operations; a failure names `what` and where."""
    default_atol, default_rtol = PEER_TOLERANCE.get(want.dtype, PEER_TOLERANCE[torch.float32])
    torch.testing.assert_close(got, want, atol=default_atol if atol is None else atol,
                               rtol=default_rtol if rtol is None else rtol, msg=lambda m: f"{what}: {m}")
