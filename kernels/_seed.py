"""The dropout key the Triton kernels read: an int64 (2,) tensor (Philox seed, counter offset) on the
kernel's device. Element number c of a call draws tl.rand(seed, offset + c); the kernel loads both
values itself, so under CUDA-graph replay it sees the generator state written for that replay
(fastattn/_philox.py draws them; offset 0 is the counter layout of a plain seed)."""
from __future__ import annotations

import torch


def seed_offset_tensor(seed, device) -> torch.Tensor:
    """seed: int64 tensor, (1,) seed (offset 0) or (2,) (seed, offset), on the CPU or on `device`."""
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() not in (1, 2):
        got = "None" if seed is None else (f"{seed.dtype} tensor of shape {tuple(seed.shape)}"
                                           if isinstance(seed, torch.Tensor) else type(seed).__name__)
        raise ValueError(f"fastattn: argument 'seed' got {got}; expected an int64 tensor, (1,) seed or (2,) "
                         "(seed, counter offset), when dropout_p > 0")
    device = torch.device(device)
    if seed.numel() == 2 and seed.device == device:
        return seed.reshape(2).contiguous()
    vals = seed.reshape(-1).tolist() + [0]  # a host read: only for seeds not already on the device
    return torch.tensor(vals[:2], dtype=torch.int64, device=device)
