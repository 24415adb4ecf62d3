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


# The environment variables fastattn reads outside csrc/tuning.h (the C++ table is listed from
# fastattn._C.tuning_knobs() below).
PYTHON_KNOBS = {
    "FASTATTN_BACKEND": "force one backend for every call (cuda, triton, cpu, reference)",
    "TRITON_INTERPRET": "1: run Triton kernels on CPU tensors under the interpreter (tests only)",
    "FASTATTN_TRITON_CONFIGS": "a JSON tile table written by `python -m fastattn.kernels.tune`, overriding the "
                               "built-in entries it names (kernels/configs.py)",
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
    print("tuning knobs (environment variables, read once):")
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
