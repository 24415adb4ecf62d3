"""One small attention case (forward + backward, fp16, causal, key padding, dropout) through one
backend on the GPU, checked against the float64 reference; run by bench/gpu_check.sh under
compute-sanitizer memcheck, which reports every out-of-bounds or misaligned access.

    python bench/gpu_sanitize_case.py cuda|triton
"""
import sys

import torch

import fastattn
from fastattn.reference import attention_reference


def main(backend: str) -> None:
    if backend not in ("cuda", "triton"):
        raise SystemExit(f"gpu_sanitize_case.py: argument 'backend' got {backend!r}; expected 'cuda' or 'triton'")
    torch.manual_seed(0)
    dev = "cuda"
    n, h, l, s, e = 1, 2, 77, 45, 64  # neither length a multiple of any tile
    q, k, v = (torch.randn(n, h, x, e, device=dev, dtype=torch.float16, requires_grad=True) for x in (l, s, s))
    kpm = torch.zeros(n, s, dtype=torch.bool, device=dev)
    kpm[:, s - 7:] = True
    for causal, p in ((True, 0.0), (False, 0.2)):
        torch.manual_seed(1)
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, key_padding_mask=kpm, dropout_p=p,
                                                    backend=backend)
        out.backward(torch.randn_like(out))
        if p == 0.0:
            ref = attention_reference(q.double(), k.double(), v.double(), None, kpm, 0.0, causal)
            err = (out.double() - ref).abs().max().item()
            assert err < 2e-2, f"{backend} causal={causal}: max error {err}"
            print(f"{backend} fp16 causal={causal} kpm p={p}: max error {err:.2e}")
    torch.cuda.synchronize()
    print("sanitize case done")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda")
