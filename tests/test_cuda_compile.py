"""The CUDA kernels compile for sm_80 and sm_90 without register spills — no GPU needed.

Every csrc/cuda/*.cu that includes only CUDA headers (no torch) is compiled to a cubin by the
machine's nvcc with `-Xptxas -v`, once per architecture (the two architectures in parallel
subprocesses). ptxas's report is parsed per kernel (registers, static shared memory, stack,
spill stores/loads) and printed as a table (`pytest -s` shows it); every kernel must have zero
spill stores and loads. The tensor-core kernels must contain HMMA instructions in their SASS
(read with cuobjdump from the triton wheel when it is installed). Dynamic shared memory of the
tensor-core tiles is checked at compile time by static_asserts in the headers (<= 163 KB, sm_80).

Environment: CUDA_HOME (default /usr/local/cuda).
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
NVCC = CUDA_HOME / "bin" / "nvcc"
ARCHS = ("sm_80", "sm_90")
# The flags setup.py gives nvcc for these files (C++20: torch 2.14's headers need it, kept alike here).
NVCC_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
TORCH_INCLUDE = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11)/')
LOCAL_INCLUDE = re.compile(r'#\s*include\s*"([^"]+)"')

pytestmark = pytest.mark.skipif(not NVCC.exists(), reason=f"no nvcc at {NVCC} (set CUDA_HOME)")


def _includes_torch(path: Path, seen: set[Path] | None = None) -> bool:
    """Does `path`, or a local header it includes (transitively), include a torch header?"""
    seen = set() if seen is None else seen
    if path in seen or not path.exists():
        return False
    seen.add(path)
    text = path.read_text()
    if TORCH_INCLUDE.search(text):
        return True
    return any(_includes_torch((path.parent / inc).resolve(), seen) for inc in LOCAL_INCLUDE.findall(text))


def cuda_only_sources() -> list[Path]:
    return sorted(p for p in CUDA_DIR.glob("*.cu") if not _includes_torch(p))


def _compile(src: Path, arch: str, outdir: Path) -> tuple[Path, str, str, int]:
    cubin = outdir / f"{src.stem}.{arch}.cubin"
    cmd = [str(NVCC), *NVCC_FLAGS, f"-arch={arch}", "-cubin", "-Xptxas", "-v", str(src), "-o", str(cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return cubin, arch, proc.stdout + proc.stderr, proc.returncode


def _compile_arch(arch: str, sources: list[Path], outdir: Path) -> list[tuple[Path, Path, str, str, int]]:
    out = []
    for src in sources:
        cubin, arch_, log, rc = _compile(src, arch, outdir)
        out.append((src, cubin, arch_, log, rc))
    return out


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled kernel: {regs, smem, stack, spill_stores, spill_loads}} from one ptxas -v log."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            kernels[current] = {"regs": None, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
        elif current and (m := _PROPS.search(line)):
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := _USED.search(line)):
            smem = _SMEM.search(line)
            kernels[current].update(regs=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    return kernels


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def _short(demangled: str) -> str:
    s = demangled.replace("fastattn::cuda::", "").replace("(anonymous namespace)::", "")
    s = s.replace("(fastattn::cuda::AttnParams)", "").replace("__nv_bfloat16", "bf16").replace("__half", "fp16")
    return re.sub(r"\(.*\)$", "", s)


@pytest.fixture(scope="module")
def build():
    sources = cuda_only_sources()
    assert sources, f"no CUDA-only .cu files found in {CUDA_DIR}"
    with tempfile.TemporaryDirectory(prefix="fastattn-nvcc-") as tmp:
        outdir = Path(tmp)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(ARCHS)) as pool:
            per_arch = list(pool.map(lambda a: _compile_arch(a, sources, outdir), ARCHS))
        results = [r for rs in per_arch for r in rs]
        failures = [f"{src.name} [{arch}] exit {rc}:\n{log[-4000:]}" for src, _, arch, log, rc in results if rc != 0]
        rows = []
        for src, cubin, arch, log, rc in results:
            for name, info in parse_ptxas(log).items():
                rows.append({"file": src.name, "arch": arch, "kernel": name, "cubin": cubin, **info})
        names = _demangle(sorted({r["kernel"] for r in rows}))
        for r in rows:
            r["pretty"] = _short(names[r["kernel"]])
        sass = _sass_by_kernel({r["cubin"] for r in rows})
        yield {"sources": sources, "failures": failures, "rows": rows, "sass": sass}


def _cuobjdump() -> str | None:
    try:
        import triton  # noqa: PLC0415 - only to locate the binary it ships

        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.exists():
            return str(path)
    except Exception:  # noqa: BLE001
        pass
    return shutil.which("cuobjdump")


def _sass_by_kernel(cubins: set[Path]) -> dict[tuple[str, str], set[str]] | None:
    """{(arch, mangled kernel): set of SASS opcodes}, or None when no cuobjdump is available."""
    tool = _cuobjdump()
    if tool is None:
        return None
    found: dict[tuple[str, str], set[str]] = {}
    for cubin in cubins:
        if not cubin.exists():
            continue
        arch = cubin.suffixes[-2].lstrip(".")
        text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True).stdout
        current = None
        for line in text.splitlines():
            if m := re.match(r"\s*Function : (\S+)", line):
                current = (arch, m.group(1))
                found[current] = set()
            elif current and (m := re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)):
                found[current].add(m.group(1).split(".")[0])
    return found


def test_cuda_sources_compile_for_sm80_and_sm90(build):
    assert not build["failures"], "nvcc failed:\n" + "\n\n".join(build["failures"])
    header = f"{'kernel':78s} {'arch':6s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill st/ld':>11s}"
    lines = [header, "-" * len(header)]
    for r in sorted(build["rows"], key=lambda r: (r["file"], r["pretty"], r["arch"])):
        lines.append(f"{r['pretty'][:78]:78s} {r['arch']:6s} {r['regs']:>4d} {r['smem']:>6d} {r['stack']:>5d} "
                     f"{r['spill_stores']:>5d}/{r['spill_loads']:<5d}")
    print("\n" + "\n".join(lines))
    files = {r["file"] for r in build["rows"]}
    assert files == {p.name for p in build["sources"]}, (
        f"ptxas reported kernels for {sorted(files)}; expected every CUDA-only source "
        f"{sorted(p.name for p in build['sources'])}")


def test_no_register_spills(build):
    spills = [f"{r['pretty']} [{r['arch']}]: {r['spill_stores']} bytes spill stores, {r['spill_loads']} loads, "
              f"{r['regs']} registers" for r in build["rows"] if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "kernels spill registers:\n" + "\n".join(spills)


def test_every_head_dim_bucket_is_compiled(build):
    """Each dtype x bucket of the tensor-core kernels exists for both archs (the tests above would
    otherwise pass on an empty build)."""
    have = {(r["arch"], r["pretty"]) for r in build["rows"]}
    missing = []
    for arch in ARCHS:
        for dt in ("fp16", "bf16"):
            for d, bn in ((32, 64), (64, 64), (96, 64), (128, 64), (256, 32)):
                want = f"void attn_fwd_tc_kernel<{dt}, {d}, {bn}>"
                if (arch, want) not in have:
                    missing.append(f"{want} [{arch}]")
            for d in (32, 64, 96, 128, 256):
                if not any(a == arch and n.startswith(f"void attn_bwd_dq_tc_kernel<{dt}, {d},") for a, n in have):
                    missing.append(f"attn_bwd_dq_tc_kernel<{dt}, {d}, ...> [{arch}]")
                if not any(a == arch and n.startswith(f"void attn_bwd_dkdv_tc_kernel<{dt}, {d},") for a, n in have):
                    missing.append(f"attn_bwd_dkdv_tc_kernel<{dt}, {d}, ...> [{arch}]")
        for nc in (1, 2, 3, 4, 8):
            for kern in ("attn_fwd_fp32_kernel", "attn_bwd_dq_fp32_kernel", "attn_bwd_dkdv_fp32_kernel"):
                if not any(a == arch and n == f"void {kern}<{nc}>" for a, n in have):
                    missing.append(f"{kern}<{nc}> [{arch}]")
    assert not missing, "kernels not found in ptxas output:\n" + "\n".join(missing)


def test_tensor_core_kernels_use_hmma(build):
    if build["sass"] is None:
        pytest.skip("no cuobjdump (ships in the triton wheel) to read SASS with")
    tc = [r for r in build["rows"] if "_tc_kernel" in r["pretty"]]
    assert tc, "no tensor-core kernels in the build"
    without = [f"{r['pretty']} [{r['arch']}]" for r in tc
               if "HMMA" not in build["sass"].get((r["arch"], r["kernel"]), set())]
    assert not without, "tensor-core kernels without HMMA instructions in their SASS:\n" + "\n".join(without)
