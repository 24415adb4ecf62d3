"""Ahead-of-time compilation of every Triton feed-forward kernel config for sm_80 and sm_90.

No GPU and no driver are needed: triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) runs
the whole pipeline down to a cubin with the ptxas that ships in the triton wheel. For every
(kernel, specialisation, dtype, autotune config, arch) that kernels/feed_forward.py can launch this
checks: it compiles (tl.dot shape rules the interpreter does not enforce included), the shared memory
fits the chip (sm_80: 163 KB, sm_90: 227 KB per block) and ptxas reports no register spills (zero
stack frame in the cubin's resource usage). A table (kernel, dtype, specialisation, config, regs,
smem, spills) is printed.

The kernels must be imported without TRITON_INTERPRET (the interpreter replaces @triton.jit functions
and the config lists), so the compilation runs in a child process of this file with that variable
removed; the child compiles on a pool of two processes and prints one JSON line per job.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
# (dtype name, config-list class, tl.dot input precision): fp32 runs as true fp32 ("ieee") unless
# torch allows TF32, so both fp32 variants can be launched.
DTYPES = (("fp16", "16bit", "tf32"), ("bf16", "16bit", "tf32"), ("fp32", "fp32", "ieee"),
          ("fp32", "fp32", "tf32"))
WORKERS = max(2, min(8, os.cpu_count() or 2))  # 2 on this 2-core machine
CHILD_TIMEOUT_S = 1800


# ---- child side --------------------------------------------------------------------------------------
def _import_kernels():
    sys.path.insert(0, str(ROOT))
    try:
        from fastattn.kernels import feed_forward as ff
    except ImportError:
        from kernels import feed_forward as ff
    return ff


def _arg_types(kernel: str, dt: str) -> dict:
    """triton signature types of every non-constexpr argument, for data type dt."""
    p = f"*{dt}"
    i = "i32"
    if kernel == "up":
        return dict(x_ptr=p, w1_ptr=p, b1_ptr=p, h_ptr=p, pre_ptr=p, T=i, F=i, D=i, seed="*i64", p="fp32",
                    drop_scale="fp32", has_bias=i, store_pre=i, act=i, tune_m=i, tune_n=i, tune_k=i)
    if kernel == "linear":
        return dict(a_ptr=p, b_ptr=p, bias_ptr=p, c_ptr=p, M=i, N=i, K=i, lda=i, ldb=i, has_bias=i, act=i,
                    tune_m=i, tune_n=i, tune_k=i)
    if kernel == "dh":
        return dict(go_ptr=p, w2_ptr=p, pre_ptr=p, dpre_ptr=p, h_ptr=p, db1p_ptr="*fp32", T=i, F=i, D2=i,
                    seed="*i64", p="fp32", drop_scale="fp32", store_h=i, act=i, tune_m=i, tune_n=i, tune_k=i)
    raise KeyError(kernel)


# integer arguments the JIT never specialises (do_not_specialize) or that are not shape-like; in the
# "aligned" variant every other int (T, D, F, M, N, K, lda, ldb ...) is divisible by 16, the usual
# case of token counts that are a multiple of 16 with 768/3072-like sizes
_NOT_ALIGNED = {"seed", "p", "drop_scale", "has_bias", "store_pre", "store_h", "act", "tune_m", "tune_n",
                "tune_k", "R", "rows_per_prog"}


def make_ast_source(fn, types: dict, constexprs: dict, aligned: bool):
    """ASTSource for fn through the shared version shim (kernels/_aot_compat.py, also used by the
    attention AOT check). aligned: pointers and shape-like ints divisible by 16 (what the JIT sees
    for 768/3072 sizes); pointers always are, but the seed pointer (do_not_specialize)."""
    sys.path.insert(0, str(ROOT))
    try:
        from fastattn.kernels._aot_compat import make_ast_source as shared
    except ImportError:  # a checkout that was never installed
        from kernels._aot_compat import make_ast_source as shared
    divisible = [n for n in fn.arg_names if n in types and n not in _NOT_ALIGNED  # the seed pointer: unspecialised
                 and (types[n].startswith("*") or aligned)]
    return shared(fn, types, constexprs, divisible)


def _jobs(ff) -> list[dict]:
    """every (kernel, specialisation, dtype, config, arch) the launchers can run."""
    jobs = []

    def add(kernel, fn_name, dt, spec, consts, cfg, aligned=True, types=None):
        meta = dict(cfg.kwargs) if cfg is not None else {}
        warps = cfg.num_warps if cfg is not None else consts.pop("num_warps")
        stages = cfg.num_stages if cfg is not None else None
        cfg_txt = (f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} w{warps} s{stages}"
                   + (f" split{meta['EPI_SPLIT']}" if "EPI_SPLIT" in meta else "")) if cfg is not None \
            else " ".join(f"{k}={v}" for k, v in consts.items()) + f" w{warps}"
        for cc in ARCHS:
            jobs.append(dict(kernel=kernel, fn=fn_name, dtype=dt, spec=spec,
                             consts={**consts, **meta}, warps=warps, stages=stages, cc=cc, config=cfg_txt,
                             aligned=aligned, types=types or _arg_types(kernel, dt)))

    layouts = {}  # _ffn_linear_kernel specialisations: operand layouts -> roles that launch them
    for role, flags in ff.LINEAR_ROLES.items():
        layouts.setdefault(tuple(sorted(flags.items())), []).append(role)
    for dt, cls, prec in DTYPES:
        tag = f" {prec}" if dt == "fp32" else ""
        for align in ("aligned", "unaligned"):
            aligned = align == "aligned"
            atag = tag + ("" if aligned else " unaligned")
            for cfg in ff.UP_CONFIGS[cls, align]:
                add("up", "_ffn_up_kernel", dt, "up" + atag, dict(INPUT_PRECISION=prec), cfg, aligned)
            for cfg in ff.DH_CONFIGS[cls, align]:
                add("dh", "_ffn_dh_kernel", dt, "dh" + atag, dict(INPUT_PRECISION=prec, DB1_ROWS=ff.DB1_ROWS), cfg,
                    aligned)
            for flags, roles in layouts.items():
                table = ff.PROLOGUE_CONFIGS if dict(flags)["B_FROM_PRE"] else ff.LINEAR_CONFIGS
                for cfg in table.get((cls, align), []):  # the prologue path is 16-bit only
                    add("linear", "_ffn_linear_kernel", dt, "/".join(roles) + atag,
                        dict(INPUT_PRECISION=prec, **dict(flags)), cfg, aligned)
    # column sums: dOut (any dtype) -> fp32 partials or the bias dtype; fp32 partials -> bias dtype
    pairs = sorted({(src, dst) for dt in ("fp16", "bf16", "fp32") for src, dst in
                    ((dt, dt), (dt, "fp32"), ("fp32", dt))})
    for src, dst in pairs:
        add("colsum", "_ffn_colsum_kernel", src, f"{src}->{dst}",
            dict(BLOCK_R=ff.COLSUM_BLOCK_R, BLOCK_C=ff.COLSUM_BLOCK_C, num_warps=ff.COLSUM_NUM_WARPS), None,
            types=dict(x_ptr=f"*{src}", out_ptr=f"*{dst}", R="i32", C="i32", rows_per_prog="i32"))
    return jobs


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack + local bytes) of the cubin, read with the cuobjdump of the triton wheel.

    A triton kernel makes no calls and has no local arrays, so its stack frame is where ptxas puts
    spilled registers: stack bytes > 0 means spills (ptxas -v reports the same frame as
    "N bytes stack frame, M bytes spill stores")."""
    import triton
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot read resource usage from cuobjdump output:\n{out}")
    return int(m.group(1)), int(m.group(2)) + int(m.group(3))


def _compile(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    ff = _import_kernels()
    fn = getattr(ff, job["fn"])
    t0 = time.time()
    res = {k: job[k] for k in ("kernel", "dtype", "spec", "config", "cc")}
    try:
        src = make_ast_source(fn, job["types"], job["consts"], job["aligned"])
        options = {"num_warps": job["warps"]}
        if job["stages"] is not None:
            options["num_stages"] = job["stages"]
        k = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32), options=options)
        regs, spill = _resource_usage(k.asm["cubin"])
        res.update(ok=True, regs=regs, spill=spill, smem=int(k.metadata.shared))
    except Exception as exc:  # reported, and failed on, by the parent
        res.update(ok=False, error=f"{type(exc).__name__}: {exc}"[-3000:])
    res["seconds"] = round(time.time() - t0, 1)
    return res


def _child_main() -> None:
    import multiprocessing as mp
    ff = _import_kernels()
    if ff.INTERPRET:
        raise SystemExit("the AOT child must run without TRITON_INTERPRET")
    jobs = _jobs(ff)
    only = os.environ.get("FFN_AOT_ONLY")  # debugging: a substring of "kernel spec dtype config"
    if only:
        jobs = [j for j in jobs if only in f"{j['kernel']} {j['spec']} {j['dtype']} {j['config']}"]
    print(json.dumps({"jobs": len(jobs)}), flush=True)
    with mp.get_context("fork").Pool(WORKERS) as pool:
        for res in pool.imap_unordered(_compile, jobs):
            print(json.dumps(res), flush=True)


# ---- test side ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aot_results():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT_S)
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"AOT child failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    expected = lines[0]["jobs"]
    results = lines[1:]
    assert len(results) == expected, f"AOT child returned {len(results)} results for {expected} jobs"
    _print_table(results, time.time() - t0)
    return results


def _print_table(results: list[dict], seconds: float) -> None:
    rows = sorted(results, key=lambda r: (r["kernel"], r["spec"], r["dtype"], r["config"], r["cc"]))
    head = f"{'kernel':7} {'spec':30} {'dtype':5} {'config':28} {'sm':3} {'regs':>4} {'smem':>7} {'spill':>5} {'s':>5}"
    print(f"\nAOT feed-forward kernels: {len(results)} compiles in {seconds:.0f} s")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["ok"]:
            print(f"{r['kernel']:7} {r['spec']:30} {r['dtype']:5} {r['config']:28} {r['cc']:3} {r['regs']:4d} "
                  f"{r['smem']:7d} {r['spill']:5d} {r['seconds']:5.1f}")
        else:
            print(f"{r['kernel']:7} {r['spec']:30} {r['dtype']:5} {r['config']:28} {r['cc']:3} FAILED "
                  f"{r['error'].splitlines()[0][:80]}")


def _where(r: dict) -> str:
    return f"{r['kernel']} [{r['spec']}] {r['dtype']} {r['config']} sm_{r['cc']}"


def test_every_config_compiles(aot_results):
    failed = [f"{_where(r)}: {r['error']}" for r in aot_results if not r["ok"]]
    assert not failed, "configs that do not compile:\n" + "\n".join(failed)


def test_shared_memory_fits_the_chip(aot_results):
    over = [f"{_where(r)}: {r['smem']} bytes > {SMEM_LIMIT[r['cc']]}" for r in aot_results
            if r["ok"] and r["smem"] > SMEM_LIMIT[r["cc"]]]
    assert not over, "configs over the shared memory of the chip:\n" + "\n".join(over)


def test_no_register_spills(aot_results):
    spills = [f"{_where(r)}: {r['spill']} bytes of stack (spills), {r['regs']} registers" for r in aot_results
              if r["ok"] and r["spill"] > 0]
    assert not spills, "configs that spill registers (drop them from the autotune lists):\n" + "\n".join(spills)


def test_every_kernel_and_arch_is_covered(aot_results):
    seen = {(r["kernel"], r["dtype"], r["cc"]) for r in aot_results}
    for kernel in ("up", "dh", "linear"):
        for dt in ("fp16", "bf16", "fp32"):
            for cc in ARCHS:
                assert (kernel, dt, cc) in seen, f"no AOT compile of {kernel} for {dt} on sm_{cc}"


if __name__ == "__main__" and "--child" in sys.argv:
    _child_main()
