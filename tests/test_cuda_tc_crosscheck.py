"""GPU only (the device check's tc-crosscheck step): the fp16/bf16 tensor-core CUDA kernels against
the fp32 CUDA kernel on the same (rounded) inputs, forward and gradients, at the head dims and
shapes the conformance matrix does not reach with tensor cores: E 25, 80, 128, 256; L and S not
multiples of any tile; causal; key padding; dropout (both calls seeded alike draw the same mask).

Bound, as everywhere (fastattn.testing): max|out16 - out32| <= 2 * max|torch16 - ref64| + floor,
where torch16 is the reference computed in the tested dtype and ref64 in float64 on the same inputs
and the same dropout mask. Skips cleanly without CUDA or without the cuda backend.
"""
from __future__ import annotations

import pytest
import torch

import fastattn
from fastattn.reference import attention_reference
from fastattn.testing import error_floor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# (L, S, causal, key padding, dropout_p): no length a multiple of 16, 32, 64 or 128
SHAPES = [(77, 190, False, True, 0.0), (130, 130, True, False, 0.0), (200, 67, True, True, 0.0),
          (93, 141, False, True, 0.2), (150, 150, True, False, 0.1)]


def _ids(shape):
    l, s, causal, kpm, p = shape
    return f"L{l}S{s}" + ("-causal" if causal else "") + ("-kpm" if kpm else "") + (f"-drop{p}" if p else "")


def _need_cuda_backend():
    if "cuda" not in fastattn.available_backends():
        pytest.skip(f"no cuda backend: {fastattn.backend_status().get('cuda') if hasattr(fastattn, 'backend_status') else ''}")


def _run(q, k, v, kpm, causal, p, seed_value, g):
    """fastattn cuda output and input grads, with the dropout seeded by torch.manual_seed(seed_value)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(seed_value)
    out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, key_padding_mask=kpm, dropout_p=p,
                                                backend="cuda")
    grads = torch.autograd.grad(out, (q, k, v), g.to(out.dtype))
    return (out,) + grads


def _reference(q, k, v, kpm, causal, p, dtype, seed, g):
    """The reference in `dtype` without upcast (torch's same-precision yardstick) and in float64."""
    res = []
    for dt, upcast in ((dtype, False), (torch.float64, True)):
        qq, kk, vv = (t.detach().to(dt).requires_grad_() for t in (q, k, v))
        out = attention_reference(qq, kk, vv, None, kpm, p, causal, seed=seed, upcast=upcast)
        res.append((out,) + torch.autograd.grad(out, (qq, kk, vv), g.to(dt)))
    return res


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("e", [25, 80, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tensor_core_kernels_match_fp32_kernel(dtype, e, shape):
    _need_cuda_backend()
    l, s, causal, use_kpm, p = shape
    n, h = 2, 3
    gen = torch.Generator(device="cuda").manual_seed(e * 1000 + l)
    q, k, v = (torch.randn(n, h, x, e, device="cuda", generator=gen).to(dtype) for x in (l, s, s))
    g = torch.randn(n, h, l, e, device="cuda", generator=gen)
    kpm = None
    if use_kpm:
        kpm = torch.zeros(n, s, dtype=torch.bool, device="cuda")
        kpm[0, s - 9:] = True
        kpm[1, : s // 3] = True
    seed_value = 1234 + e
    low = _run(q, k, v, kpm, causal, p, seed_value, g)
    f32 = _run(q.float(), k.float(), v.float(), kpm, causal, p, seed_value, g)
    # The reference's yardstick uses its own seed: the size of torch's rounding error does not
    # depend on which elements are dropped.
    ref_seed = torch.tensor([987654321], dtype=torch.int64)
    same, ref64 = _reference(q, k, v, kpm, causal, p, dtype, ref_seed, g)
    for name, a, b, t16, t64 in zip(("out", "dq", "dk", "dv"), low, f32, same, ref64):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"{name}: dtype {a.dtype} or non-finite values"
        err = (a.double() - b.double()).abs().max().item()
        torch_err = (t16.double() - t64).abs().max().item()
        bound = 2 * torch_err + error_floor(dtype)
        assert err <= bound, (f"{name} {dtype} E{e} {_ids(shape)}: max |{dtype} kernel - fp32 kernel| = {err:.3e} "
                              f"> {bound:.3e} = 2 x torch's {dtype} error {torch_err:.3e} + floor")
    if p:
        # the two kernels agreed above only because one seed drew one mask; another seed drops others
        assert not torch.equal(low[0], _run(q, k, v, kpm, causal, p, seed_value + 1, g)[0]), "a new seed must drop others"

