"""Ahead-of-time compilation of the Triton attention kernels for sm_80 and sm_90, without a GPU.

Every configuration the launchers can choose is listed by kernels.attention.compile_cases()
(kernel x dtype class x head-dim bucket x mask/kpm/dropout specialisation x config; causality is a
runtime argument, so causal and non-causal calls run the same compiled kernel). Each is compiled,
for every element dtype (fp16, bf16, fp32 as ieee and as tf32) and for sm_80 and sm_90, with
triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32)) by kernels/_attn_aot.py in
worker processes with TRITON_INTERPRET removed (under the interpreter triton.jit gives functions
that cannot be compiled), and the test asserts, per compiled kernel: it compiled, shared memory
fits the chip (A100 163 KB, H100 227 KB), ptxas reports no register spills and the cubin has no
stack/local memory. The whole cross product runs in `make test`: 854 compiles, 1685 CPU-seconds cold
(triton 3.9; 31.5 min wall on the 2-core dev machine while it was shared, load 4-6, so about 14 min
with its 2 cores free); the table (kernel, dtype, head dim, arch, specialisation, config, regs, smem, spills)
is printed (pytest -s) and written to aot_table.txt in the test's tmp dir, named in the failure
message. FASTATTN_AOT_JOBS sets the number of compile processes (default: the cores, 2..8).
By hand, a quick look at a part: python -m kernels._attn_aot --filter fwd --sample 40 --verbose
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _compile(tmp_path) -> list[dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # compile real cubins
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its (and 3.6's) default
    out = tmp_path / "aot.json"
    jobs = os.environ.get("FASTATTN_AOT_JOBS", str(max(2, min(os.cpu_count() or 2, 8))))
    proc = subprocess.run([sys.executable, "-m", "kernels._attn_aot", "--json", str(out), "--jobs", jobs],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), f"kernels._attn_aot produced no result (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    print(proc.stdout)  # the table (kernel, dtype, hd, arch, spec, config, regs, smem, spills): pytest -s shows it
    return json.loads(out.read_text())


def _problems(rows) -> list[str]:
    bad = []
    for r in rows:
        what = f"{r['kernel']} {r['dtype']} hd{r['head_dim']} sm_{r['arch']} {r['spec']} {r['config']}"
        if r["error"]:
            bad.append(f"{what}: does not compile: {r['error']}")
            continue
        if r["smem"] > SMEM_LIMIT[r["arch"]]:
            bad.append(f"{what}: shared memory {r['smem']} B, the chip has {SMEM_LIMIT[r['arch']]} B")
        if r.get("spill_stores", 0) or r.get("spill_loads", 0):
            bad.append(f"{what}: ptxas spills {r.get('spill_stores')} B stores / {r.get('spill_loads')} B loads")
        if r.get("stack", 0) or r.get("local", 0):
            bad.append(f"{what}: cubin uses stack {r.get('stack')} B / local {r.get('local')} B (spills)")
        if r.get("regs") is None:
            bad.append(f"{what}: no register count could be read (cuobjdump missing and ptxas log empty)")
    return bad


def test_every_choosable_configuration_compiles_for_sm80_sm90_without_spills(tmp_path):
    rows = _compile(tmp_path)
    sys.path.insert(0, str(ROOT))
    from kernels import _attn_aot

    table = tmp_path / "aot_table.txt"
    table.write_text(_attn_aot.format_table(rows) + "\n")
    print(f"\n{len(rows)} compiles; the table: {table}")
    assert len(rows) == len(_attn_aot.all_jobs()), "not every listed configuration was compiled"
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["kernel"] for r in rows} == {"fwd", "bwd_dkdv", "bwd_dq", "bwd_delta"}
    assert {r["dtype"] for r in rows} == {"f16", "bf16", "f32", "tf32"}
    bad = _problems(rows)
    assert not bad, (f"{len(bad)} of {len(rows)} configurations fail (full table: {table}; remove or replace "
                     "them in kernels/attention.py's config tables):\n" + "\n".join(bad))


def test_astsource_shim_matches_this_triton():
    # The shim must pick the (signature by name, constexprs by name, attrs by index path) spelling
    # on triton >= 3.2 (3.6 and 3.9 here); a compile needs no driver.
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "import triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from kernels import attention as A, _attn_aot as T\n"
        "from kernels._aot_compat import make_ast_source\n"
        "c = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, BLOCK_DV=32, HAS_MASK=False, HAS_KPM=False,"
        " INPUT_PRECISION='tf32')\n"
        "types, divisible = T._signature(A._attn_bwd_delta_kernel, 'f16', c)\n"
        "k = triton.compile(make_ast_source(A._attn_bwd_delta_kernel, types, c, divisible),"
        " target=GPUTarget('cuda', 80, 32), options=dict(num_warps=1))\n"
        "assert b'sm_80' in k.asm['ptx'].encode() or 'sm_80' in k.asm['ptx']\n"
        "print('cubin', len(k.asm['cubin']), 'regs', T._resource_usage(k.asm['cubin']).get('reg'))\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cubin" in proc.stdout and "regs None" not in proc.stdout, proc.stdout
