"""python -m fastattn.info: version, how the extension was built, and each backend's status."""
from __future__ import annotations

import platform

import torch

import fastattn
from fastattn import ops
from fastattn.backends import PRIORITY, get_backend


def main() -> None:
    print(f"fastattn {fastattn.__version__}  (torch {torch.__version__}, python {platform.python_version()})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    info = ops.build_info()
    if info:
        print("fastattn._C build:")
        for key, val in info.items():
            print(f"  {key}: {val}")
    else:
        print(f"fastattn._C: {ops.extension_error()}")
    try:
        from fastattn import _C

        knobs = _C.tuning_knobs()
    except (ImportError, AttributeError):
        knobs = {}
    if knobs:
        print("C++ tuning knobs (environment variables, read once per process):")
        for name, (value, meaning) in knobs.items():
            print(f"  {name}={value}: {meaning}")
    print("backends (automatic priority order):")
    for name in PRIORITY:
        be = get_backend(name)
        why = be.unavailable_reason()
        if why is None:
            gaps = [f"{kind}: {r}" for kind in ("attention", "ffn") if (r := be.op_unavailable_reason(kind))]
            status = "available" + (f" (but {'; '.join(gaps)})" if gaps else "")
        else:
            status = f"not available: {why}"
        devs = ", ".join(be.devices)
        dts = ", ".join(str(d).replace("torch.", "") for d in be.dtypes)
        line = f"  {name:9s} {status}\n            devices: {devs}; dtypes: {dts}"
        if be.dtypes_for("ffn") != be.dtypes:
            line += " (feed-forward: " + ", ".join(str(d).replace("torch.", "") for d in be.dtypes_for("ffn")) + ")"
        print(line)


if __name__ == "__main__":
    main()
