"""bench/report.py on hand-made pytest-benchmark JSON: tables, speedups and the targets' verdicts.

No benchmark runs here (these are plain tests collected with the suites); they pin what the report
computes, so a wrong ratio in a results file cannot come from the report.
"""
from __future__ import annotations

import json

import report


def _bench(group, method, median, *, baseline, flops=1e9, **info):
    extra = {"method": method, "baseline": baseline, "flops": flops, "device_type": "cuda",
             "device_name": "Test GPU", "torch": "9.9", "triton": "9.9", **info}
    return {"group": group, "name": f"t[{group}::{method}]", "extra_info": extra,
            "stats": {"median": median, "iqr": median / 10, "rounds": 5}}


def _write(tmp_path, benchmarks):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmarks": benchmarks, "datetime": "2026-01-01T00:00:00"}))
    return str(path)


FWD = {"op": "attention", "pass": "fwd", "dtype": "bfloat16", "E": 128, "variant": "none"}


def test_speedup_tflops_and_time_ratio(tmp_path):
    g1 = "gpu/attention/fwd/bf16/N4-H16-L4096-E128"
    g2 = "gpu/attention/fwd/bf16/N16-H16-L1024-E128"
    gpad = g1 + "/kpad50"
    benches = [
        _bench(g1, "torch SDPA", 2e-3, baseline="torch SDPA", L=4096, flops=1e12, **FWD),
        _bench(g1, "fastattn[triton]", 1e-3, baseline="torch SDPA", L=4096, flops=1e12, **FWD),   # 2x, 1000 TFLOP/s
        _bench(g2, "torch SDPA", 1e-3, baseline="torch SDPA", L=1024, **FWD),
        _bench(g2, "fastattn[triton]", 1e-3, baseline="torch SDPA", L=1024, **FWD),               # 1x
        _bench(gpad, "fastattn[triton]", 0.5e-3, baseline="torch SDPA", L=4096, twin=g1,
               **{**FWD, "variant": "kpad50"}),                                                    # 0.5 of g1
    ]
    run = report.load([_write(tmp_path, benches)])
    by_what = {t.what: t for t in report.TARGETS if t.method == "fastattn[triton]"}

    r = report.evaluate(by_what["attention fwd vs SDPA flash"], run)
    assert r["n"] == 2 and r["met"] == 1 and r["verdict"] == "MISSED"
    assert abs(r["min"] - 1.0) < 1e-12 and abs(r["max"] - 2.0) < 1e-12 and r["worst"] == g2

    r = report.evaluate(by_what["attention fwd TFLOP/s, hd128 seq>=4k, non-causal"], run)
    assert r["n"] == 1 and abs(r["min"] - 1000.0) < 1e-9 and r["verdict"] == "met"   # L=1024 left out

    r = report.evaluate(by_what["half the keys padded: time / unpadded"], run)
    assert r["n"] == 1 and abs(r["min"] - 0.5) < 1e-12 and r["verdict"] == "met"

    r = report.evaluate(by_what["attention fwd+bwd vs SDPA flash"], run)
    assert r["n"] == 0 and r["verdict"] == "not measured"


def test_markdown_and_plots(tmp_path):
    g = "gpu/ffn/fwd/bf16/T8192-D768-F3072"
    info = {"op": "ffn", "pass": "fwd", "dtype": "bfloat16", "family": "gpu/ffn/fwd/bf16/D768-F3072",
            "x": 8192, "x_name": "T"}
    benches = [_bench(g, "eager Linear-ReLU-Linear", 4e-3, baseline="eager Linear-ReLU-Linear", **info),
               _bench(g, "fastattn[cuda]", 2e-3, baseline="eager Linear-ReLU-Linear", **info)]
    out = tmp_path / "r.md"
    assert report.main([_write(tmp_path, benches), "--out", str(out), "--plots", str(tmp_path / "p")]) == 0
    text = out.read_text()
    assert "Test GPU" in text and "torch 9.9" in text
    row = next(line for line in text.splitlines() if line.startswith("| fastattn[cuda]"))
    assert "2×" in row and "2 ms" in row and "| 0.5 |" in row      # 1e9 FLOP in 2 ms = 0.5 TFLOP/s
    assert (tmp_path / "p" / "gpu-ffn.png").stat().st_size > 0
    assert "issue(s) 5" in text                                       # CPU targets: no CPU results here


def test_missing_input_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope.json"), "--out", str(tmp_path / "x.md")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_sweep_families_lowest_ratio_and_machine_limits(tmp_path):
    """Per family the lowest peer/method ratio over its groups (and where), GB/s or GFLOP/s reached,
    the targets of issue 11, and the machine-limits table; limit rows stay out of the plots."""
    cpu = {"device_type": "cpu", "device_name": "Test CPU", "threads": 2}
    tiny = {**cpu, "op": "tiny_attention", "pass": "fwd", "dtype": "float32", "sweep": "tiny calls",
            "target_ratio": 1 / 1.5}
    mods = {**cpu, "op": "mha", "pass": "eval", "dtype": "float32", "sweep": "modules at small shapes",
            "target_ratio": 1.0}
    lim = {**cpu, "op": "machine", "pass": "limit", "sweep": "machine limits"}
    g_t, g_m1, g_m2 = "cpu/tiny/a", "cpu/mha/a", "cpu/mha/b"
    benches = [
        _bench(g_t, "torch SDPA", 10e-6, baseline="torch SDPA", flops=1e4, **tiny),
        _bench(g_t, "fastattn[cpu]", 20e-6, baseline="torch SDPA", flops=1e4, **tiny),              # 0.5x
        _bench(g_m1, "nn.MultiheadAttention", 3e-3, baseline="nn.MultiheadAttention", flops=3e8, **mods),
        _bench(g_m1, "fastattn[cpu]", 2e-3, baseline="nn.MultiheadAttention", flops=3e8, **mods),     # 1.5x
        _bench(g_m2, "nn.MultiheadAttention", 1e-3, baseline="nn.MultiheadAttention", flops=1e6, **mods),
        _bench(g_m2, "fastattn[cpu]", 1.25e-3, baseline="nn.MultiheadAttention", flops=1e6, **mods),  # 0.8x
        _bench("cpu/machine/mem", "torch.sum", 4e-3, baseline="torch.sum", flops=0.0, bytes=2.68e8,
               limit="memory read bandwidth", **lim),                                                   # 67 GB/s
        _bench("cpu/machine/gemm", "torch.mm fp32", 0.1, baseline="torch.mm fp32", flops=2e10,
               limit="fp32 GEMM peak", **lim),                                                          # 200 GFLOP/s
    ]
    run = report.load([_write(tmp_path, benches)])
    fams = {f["sweep"]: f for f in report.sweep_summary(run)}
    assert set(fams) == {"tiny calls", "modules at small shapes"}      # limits are not a ratio family
    t, m = fams["tiny calls"], fams["modules at small shapes"]
    assert abs(t["lowest"] - 0.5) < 1e-12 and t["met"] == 0 and t["groups"] == 1
    assert abs(m["lowest"] - 0.8) < 1e-12 and m["worst"] == g_m2 and m["met"] == 1 and m["groups"] == 2
    assert abs(m["median"] - 1.15) < 1e-12
    assert abs(m["rate_at_worst"][0] - 0.8) < 1e-9 and m["rate_at_worst"][1] == "GFLOP/s"   # 1e6 / 1.25 ms
    assert abs(m["best_rate"][0] - 150.0) < 1e-9 and m["best_group"] == g_m1                # 3e8 / 2 ms
    by_what = {t.what: t for t in report.TARGETS if t.issue == 11}
    r = report.evaluate(by_what["MultiheadAttention at small shapes"], run)
    assert r["n"] == 2 and r["met"] == 1 and r["verdict"] == "MISSED" and r["worst"] == g_m2
    r = report.evaluate(by_what["tiny calls: time <= 1.5x torch SDPA"], run)
    assert r["n"] == 1 and r["verdict"] == "MISSED"

    out = tmp_path / "r.md"
    assert report.main([_write(tmp_path, benches), "--out", str(out), "--plots", str(tmp_path / "p")]) == 0
    text = out.read_text()
    assert "## Sweeps: lowest ratio per family" in text and "## Machine limits" in text
    row = next(line for line in text.splitlines() if line.startswith("| modules at small shapes"))
    assert "| 0.8× |" in row and g_m2 in row and "| 1/2 |" in row
    mem = next(line for line in text.splitlines() if line.startswith("| memory read bandwidth"))
    assert "67 GB/s" in mem
    gemm = next(line for line in text.splitlines() if line.startswith("| fp32 GEMM peak"))
    assert "200 GFLOP/s" in gemm
    assert not (tmp_path / "p" / "cpu-machine.png").exists()


def test_decode_and_bf16_families(tmp_path):
    """The decode family reports GB/s (extra_info["bytes"]: the K/V bytes read) and its >= 1.5x target;
    the bf16 family is judged against fastattn's own fp32 row only where bf16 dot products served."""
    cpu = {"device_type": "cpu", "device_name": "Test CPU", "threads": 2}
    dec = {**cpu, "op": "decode", "pass": "fwd", "dtype": "float32"}
    bf = {**cpu, "op": "attention", "pass": "fwd", "dtype": "bfloat16", "variant": "vs-fp32"}
    fp32 = "fastattn[cpu] fp32 (same shape)"
    benches = [
        _bench("cpu/decode/a", "torch SDPA", 1.0e-3, baseline="torch SDPA", flops=1e6, bytes=3.2e7, **dec),
        _bench("cpu/decode/a", "fastattn[cpu]", 0.5e-3, baseline="torch SDPA", flops=1e6, bytes=3.2e7,
               sweep="decode", target_ratio=1.5, **dec),                                     # 2x, 64 GB/s
        _bench("cpu/decode/b", "torch SDPA", 1.0e-3, baseline="torch SDPA", flops=1e6, bytes=3.2e7, **dec),
        _bench("cpu/decode/b", "fastattn[cpu]", 0.8e-3, baseline="torch SDPA", flops=1e6, bytes=3.2e7,
               sweep="decode", target_ratio=1.5, **dec),                                     # 1.25x, 40 GB/s
        _bench("cpu/bf16/a", fp32, 2e-3, baseline=fp32, flops=1e9, bf16_path="bf16dot", **bf),
        _bench("cpu/bf16/a", "fastattn[cpu] bf16", 1e-3, baseline=fp32, flops=1e9, bf16_path="bf16dot",
               sweep="bf16 vs fp32", target_ratio=1.33, **bf),                                # 2x
        _bench("cpu/bf16/b", fp32, 2e-3, baseline=fp32, flops=1e9, bf16_path="fp32-convert", **bf),
        _bench("cpu/bf16/b", "fastattn[cpu] bf16", 4e-3, baseline=fp32, flops=1e9, bf16_path="fp32-convert",
               **bf),                                                                          # no bf16 dot: not judged
    ]
    run = report.load([_write(tmp_path, benches)])
    fams = {f["sweep"]: f for f in report.sweep_summary(run)}
    d, b = fams["decode"], fams["bf16 vs fp32"]
    assert abs(d["lowest"] - 1.25) < 1e-12 and d["worst"] == "cpu/decode/b" and d["met"] == 1
    assert d["rate_at_worst"][1] == "GB/s" and abs(d["rate_at_worst"][0] - 40.0) < 1e-9
    assert abs(d["best_rate"][0] - 64.0) < 1e-9
    assert b["groups"] == 1 and abs(b["lowest"] - 2.0) < 1e-12 and b["met"] == 1
    by_what = {t.what: t for t in report.TARGETS if t.issue == 11}
    r = report.evaluate(by_what["decode (L1 against a KV cache)"], run)
    assert r["n"] == 2 and r["met"] == 1 and r["verdict"] == "MISSED" and r["worst"] == "cpu/decode/b"
    r = report.evaluate(by_what["bf16 vs fastattn fp32 (bf16 dot products)"], run)
    assert r["n"] == 1 and r["verdict"] == "met"
