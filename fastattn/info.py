"""python -m fastattn.info: version, how the extension was built, and each backend's status."""
from __future__ import annotations

import os
import platform

import torch

import fastattn
from fastattn import _library
from fastattn.backends import PRIORITY, family_impls, unavailable_reason


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# Every environment variable fastattn reads outside csrc/tuning.h (the C++ table is listed from
# fastattn._C.tuning_knobs() below), so `python -m fastattn.info` lists them all in one place.
PYTHON_KNOBS = {
    "FASTATTN_BACKEND": "force one backend for every call (cuda, triton, cpu, reference)",
    "TRITON_INTERPRET": "1: run Triton kernels on CPU tensors under the interpreter (tests only)",
    "FASTATTN_TRITON_CONFIGS": "a JSON tile table written by `python -m fastattn.kernels.tune`, overriding the "
                               "built-in entries it names (kernels/configs.py)",
    "FASTATTN_TRITON_ATTN": "sm90 (default on sm_90) or classic: which Triton attention kernels serve a call "
                            "(kernels/attention_sm90*.py or kernels/attention.py); read once",
    "FASTATTN_CPU_ONEDNN_LINEAR": "0: the modules' float32 linears (K >= 512; with autograd the plain "
                                  "projections, forward and input gradient) through torch's MKL addmm "
                                  "instead of oneDNN (torch.ops.mkldnn._linear_pointwise); read once",
    "FASTATTN_TRITON_SMALL": "1 (default) or 0: the one-program-per-(batch, head) Triton attention for S <= 256 "
                             "(kernels/attention_small.py; forward and one-launch backward), tried first; read once",
    # C++ switches read once, outside the tuning.h table (they pick a code path, not a tile size)
    "FASTATTN_CPU_DECODE": "0: the CPU decoding path (L <= 16) off",
    "FASTATTN_CPU_BF16DOT": "0: the AVX512-BF16 (vdpbf16ps) attention, decoding and feed-forward paths off",
    "FASTATTN_CPU_BF16DOT_FFN": "mm: the bf16 feed-forward through the whole-matrix oneDNN fallback (tests)",
    # C++ decode tuning, read on every call (for tuning runs; the defaults are measured)
    "FASTATTN_CPU_DECODE_CHUNK": "keys per decode task (default: from the shape, >= 256); read per call",
    "FASTATTN_CPU_DECODE_SPAN": "keys per online-softmax step of a decode task: one Q K^T pass over the "
                                "span's K, one softmax step, one P V pass over its V (default: 8192 / "
                                "(group * L) rounded to 64, at most the chunk); read per call",
    "FASTATTN_CPU_DECODE_PREFETCH": "software prefetch distance in bytes of K and of V ahead (default 16384 for "
                                    "fp32/fp64, 0 = off, the default for 16-bit K/V); read per call",
    "FASTATTN_CPU_DECODE_PF_HINT": "the decode prefetch's locality, __builtin_prefetch's 0-3 (default 1: "
                                   "prefetcht2; 3: prefetcht0, into L1); read per call",
    "FASTATTN_CPU_DECODE_PF_STEP": "bytes between the decode prefetch's touches (default 4096: one line per "
                                   "page; 64: every line); read per call",
    "FASTATTN_CPU_DECODE_ORDER": "1 (default): each thread runs its decode tasks last to first on every other "
                                 "call (the rows it read last are the likeliest still cached; results "
                                 "unchanged); 0: first to last always; read per call",
    "FASTATTN_CPU_DECODE_QK_ROWS": "1 (default): a decode block's first-row Q K^T loads key by key; 0: the "
                                   "16 keys' columns in step; read per call",
}


def main() -> None:
    print(f"fastattn {fastattn.__version__}  (torch {torch.__version__}, python {platform.python_version()})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    info = _library.build_info()
    if info:
        print("fastattn._C build:")
        for key, val in info.items():
            print(f"  {key}: {val}")
    else:
        print(f"fastattn._C: {_library.extension_error()}")
    print("backends (automatic priority order):")
    families = {"attention": family_impls("attention"), "feed-forward": family_impls("ffn")}
    for name in PRIORITY:
        why = unavailable_reason(name)
        print(f"  {name:9s} " + ("available" if why is None else f"not available: {why}"))
        for family, impls in families.items():
            impl = impls.get(name)
            if impl is None:
                continue
            gap = ""
            if why is None and impl.kernel is not None and not _library.has_kernel(*impl.kernel):
                gap = f" (this build has no {impl.kernel[1]} kernel)"
            print(f"            {family}: devices {', '.join(impl.devices)}; dtypes {_names(impl.dtypes)}{gap}")
    print("tuning knobs (environment variables; read once unless said):")
    knobs = dict((k, (os.environ.get(k, ""), v)) for k, v in PYTHON_KNOBS.items())
    ext = getattr(_library._C, "tuning_knobs", None)
    if ext is not None:
        knobs.update({k: tuple(v) for k, v in ext().items()})
    try:
        from fastattn.kernels import configs as triton_configs  # Triton's tuning knobs, when it has any

        knobs.update(getattr(triton_configs, "KNOBS", {}))
    except ImportError:
        pass
    for key, (value, meaning) in sorted(knobs.items()):
        print(f"  {key}={value!s:8s} {meaning}")


if __name__ == "__main__":
    main()
