"""Render saved pytest-benchmark JSON as markdown tables and PNG plots.

    python bench/report.py JSON [JSON...] --out FILE.md [--plots DIR] [--notes FILE ...] [--title TEXT]

One table per group (= one case, identical inputs for every row): method, median time, IQR,
rounds, throughput (GFLOP/s on the CPU, TFLOP/s on a GPU) and the speedup against the group's torch
peer (torch SDPA for attention, the eager block for the feed-forward, nn.TransformerEncoderLayer for
layers, the stock classifier). A summary table sets the issues' targets (TARGETS below, as data)
against the ratios reached. A ratio holds only against a peer measured in the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import statistics
import sys
from collections import OrderedDict, defaultdict

# Method names, as bench/common.py writes them (not imported: the report runs without torch).
SDPA = "torch SDPA"
FFN_EAGER = "eager Linear-ReLU-Linear"
FFN_COMPILE = "torch.compile(Linear-ReLU-Linear)"
CUBLAS = "cuBLAS GEMMs (torch.mm x2)"
TEL_EVAL = "nn.TransformerEncoderLayer (eval fast path)"
TEL_TRAIN = "nn.TransformerEncoderLayer"
MHA_TORCH = "nn.MultiheadAttention"
LIMITS = "machine limits"   # extra_info["sweep"] of the machine-limit rows (bench/test_bench_small.py)


@dataclasses.dataclass(frozen=True)
class Target:
    """One line of an issue's performance table.

    kind "speedup":    time(peer) / time(method) >= goal in every matched group;
    kind "tflops":     method's TFLOP/s >= goal in every matched group;
    kind "time_ratio": time(method, group) / time(method, the group's twin) <= goal (twin = the same
                       call without the variant, named in extra_info["twin"]).
    ``where``: extra_info fields a group must have; a tuple = any of; a "NAME__min" key = at least.
    """
    issue: int
    what: str
    method: str
    where: dict
    goal: float
    kind: str = "speedup"
    peer: str | None = None


_CPU = {"device_type": "cpu"}
_GPU_SEQ = {"device_type": "cuda", "dtype": ("float16", "bfloat16"), "E": (64, 128), "variant": ("none", "causal")}

TARGETS = [
    # issue 5: the CPU backend, fp32 unless said
    Target(5, "attention fwd, N32 H4 L256 E25", "fastattn[cpu]",
           {**_CPU, "op": "attention", "pass": "fwd", "dtype": "float32", "E": 25}, 1.3, peer=SDPA),
    Target(5, "attention fwd+bwd, N32 H4 L256 E25", "fastattn[cpu]",
           {**_CPU, "op": "attention", "pass": "fwd+bwd", "dtype": "float32", "E": 25}, 1.3, peer=SDPA),
    Target(5, "attention fwd, N8 H12 L512 E64", "fastattn[cpu]",
           {**_CPU, "op": "attention", "pass": "fwd", "dtype": "float32", "E": 64}, 1.0, peer=SDPA),
    Target(5, "attention fwd+bwd, N8 H12 L512 E64", "fastattn[cpu]",
           {**_CPU, "op": "attention", "pass": "fwd+bwd", "dtype": "float32", "E": 64}, 1.0, peer=SDPA),
    Target(5, "attention fwd bf16, both shapes", "fastattn[cpu]",
           {**_CPU, "op": "attention", "pass": "fwd", "dtype": "bfloat16"}, 2.0, peer=SDPA),
    Target(5, "feed-forward fwd, 8192 tok 100-2048-100", "fastattn[cpu]",
           {**_CPU, "op": "ffn", "pass": "fwd"}, 1.5, peer=FFN_EAGER),
    Target(5, "feed-forward fwd vs torch.compile", "fastattn[cpu]",
           {**_CPU, "op": "ffn", "pass": "fwd"}, 1.2, peer=FFN_COMPILE),
    Target(5, "feed-forward fwd+bwd", "fastattn[cpu]",
           {**_CPU, "op": "ffn", "pass": "fwd+bwd"}, 1.3, peer=FFN_EAGER),
    Target(5, "encoder layer eval (fast path peer)", "fastattn[cpu]",
           {**_CPU, "op": "encoder_layer", "pass": "eval"}, 1.3, peer=TEL_EVAL),
    Target(5, "encoder layer train step", "fastattn[cpu]",
           {**_CPU, "op": "encoder_layer", "pass": "train"}, 1.3, peer=TEL_TRAIN),
    # issue 3: the Triton attention on a GPU (H100), fp16/bf16, hd 64/128, seq 1k-16k
    Target(3, "attention fwd vs SDPA flash", "fastattn[triton]",
           {**_GPU_SEQ, "op": "attention", "pass": "fwd"}, 1.2, peer=SDPA),
    Target(3, "attention fwd TFLOP/s, hd128 seq>=4k, non-causal", "fastattn[triton]",
           {**_GPU_SEQ, "op": "attention", "pass": "fwd", "E": 128, "L__min": 4096, "variant": "none"}, 400.0,
           kind="tflops"),
    Target(3, "attention fwd+bwd vs SDPA flash", "fastattn[triton]",
           {**_GPU_SEQ, "op": "attention", "pass": "fwd+bwd"}, 1.0, peer=SDPA),
    Target(3, "half the keys padded: time / unpadded", "fastattn[triton]",
           {"device_type": "cuda", "op": "attention", "variant": "kpad50"}, 0.6, kind="time_ratio"),
    # issue 4: the Triton feed-forward on a GPU
    Target(4, "ffn fwd+bwd vs eager", "fastattn[triton]",
           {"device_type": "cuda", "op": "ffn", "pass": "fwd+bwd"}, 1.1, peer=FFN_EAGER),
    Target(4, "ffn fwd+bwd vs torch.compile", "fastattn[triton]",
           {"device_type": "cuda", "op": "ffn", "pass": "fwd+bwd"}, 1.0, peer=FFN_COMPILE),
    Target(4, "ffn fwd vs cuBLAS GEMM throughput", "fastattn[triton]",
           {"device_type": "cuda", "op": "ffn", "pass": "fwd"}, 0.85, peer=CUBLAS),
    # issue 6: the CUDA C++ backend on a GPU
    Target(6, "attention fwd vs SDPA flash", "fastattn[cuda]",
           {**_GPU_SEQ, "op": "attention", "pass": "fwd"}, 1.0, peer=SDPA),
    Target(6, "attention fwd+bwd vs SDPA flash", "fastattn[cuda]",
           {**_GPU_SEQ, "op": "attention", "pass": "fwd+bwd"}, 0.9, peer=SDPA),
    Target(6, "attention, classifier shape hd25 L256", "fastattn[cuda]",
           {"device_type": "cuda", "op": "attention", "E": 25}, 1.5, peer=SDPA),
    Target(6, "ffn fwd+bwd vs eager", "fastattn[cuda]",
           {"device_type": "cuda", "op": "ffn", "pass": "fwd+bwd"}, 1.0, peer=FFN_EAGER),
    # issue 11: small shapes on the CPU (bench/test_bench_small.py)
    Target(11, "tiny calls: time <= 1.5x torch SDPA", "fastattn[cpu]",
           {**_CPU, "op": "tiny_attention"}, 1 / 1.5, peer=SDPA),
    Target(11, "MultiheadAttention at small shapes", "fastattn[cpu]",
           {**_CPU, "op": "mha"}, 1.0, peer=MHA_TORCH),
    Target(11, "TransformerEncoderLayer at small shapes", "fastattn[cpu]",
           {**_CPU, "op": "encoder_layer_small"}, 1.0, peer=TEL_TRAIN),
    Target(11, "decode (L1 against a KV cache)", "fastattn[cpu]", {**_CPU, "op": "decode"}, 1.5, peer=SDPA),
    Target(11, "bf16 vs fastattn fp32 (bf16 dot products)", "fastattn[cpu] bf16",
           {**_CPU, "variant": "vs-fp32", "bf16_path": ("bf16dot", "amx")}, 1.33,
           peer="fastattn[cpu] fp32 (same shape)"),
]

_OP_ORDER = {"attention": 0, "ffn": 1, "encoder_layer": 2, "classifier": 3, "tiny_attention": 4, "mha": 5,
             "encoder_layer_small": 6, "decode": 7, "machine": 9}
_PASS_ORDER = {"fwd": 0, "eval": 0, "fwd+bwd": 1, "train": 1}


# -- loading --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    group: str
    method: str
    median: float
    iqr: float
    rounds: int
    info: dict

    @property
    def gpu(self) -> bool:
        return self.info.get("device_type") == "cuda"

    @property
    def throughput(self) -> float | None:
        flops = self.info.get("flops")
        return flops / self.median if flops and self.median > 0 else None


@dataclasses.dataclass
class Run:
    rows: "OrderedDict[str, OrderedDict[str, Row]]"  # group -> method -> row
    sources: list
    machine: list
    datetimes: list
    commits: list
    replaced: int


def load(paths: list[str]) -> Run:
    groups: "OrderedDict[str, OrderedDict[str, Row]]" = OrderedDict()
    sources, machine, datetimes, commits = [], [], [], []
    replaced = 0
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        sources.append(path)
        mi = data.get("machine_info", {})
        cpu = (mi.get("cpu") or {}).get("brand_raw")
        if cpu:
            machine.append(f"{mi.get('node', '?')}: {cpu}")
        if data.get("datetime"):
            datetimes.append(data["datetime"])
        ci = data.get("commit_info") or {}
        if ci.get("id"):
            commits.append(f"{ci['id'][:10]}{' (dirty)' if ci.get('dirty') else ''}")
        for b in data.get("benchmarks", []):
            info = b.get("extra_info") or {}
            st = b.get("stats") or {}
            if "median" not in st:
                continue
            method = info.get("method") or b.get("name")
            group = b.get("group") or b.get("name")
            g = groups.setdefault(group, OrderedDict())
            replaced += method in g
            g[method] = Row(group, method, st["median"], st.get("iqr", 0.0), st.get("rounds", 0), info)
    return Run(groups, sources, machine, datetimes, commits, replaced)


# -- formatting -----------------------------------------------------------------------------------
def fmt_time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} µs"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:,.0f}"


def _sort_key(group: str, rows: dict):
    info = next(iter(rows.values())).info
    return (info.get("device_type", ""), _OP_ORDER.get(info.get("op"), 9), _PASS_ORDER.get(info.get("pass"), 9),
            info.get("family", group), info.get("x", 0), group)


def _method_label(row: Row) -> str:
    label = row.method
    if row.info.get("sdpa_backend"):
        label += f" [{row.info['sdpa_backend']}]"
    if row.info.get("torch_fast_path") is False:
        label += " (fast path NOT taken)"
    return label


def speedup(rows: dict, row: Row) -> float | None:
    base = rows.get(row.info.get("baseline"))
    if base is None or row.median <= 0:
        return None
    return base.median / row.median


def group_table(group: str, rows: dict) -> list[str]:
    first = next(iter(rows.values()))
    gpu = first.gpu
    unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    baseline = first.info.get("baseline", "?")
    info = first.info
    facts = [f"peer: {baseline}"]
    for k in ("activation", "dropout_p", "twin"):
        if k in info:
            facts.append(f"{k}: {info[k]}")
    out = [f"### `{group}`", "", "; ".join(facts), "",
           f"| method | median | IQR | rounds | {unit} | × vs peer |", "|---|---:|---:|---:|---:|---:|"]
    ordered = sorted(rows.values(), key=lambda r: (r.method != baseline, r.median))
    for r in ordered:
        tp = r.throughput
        sp = speedup(rows, r)
        out.append(f"| {_method_label(r)} | {fmt_time(r.median)} | {fmt_time(r.iqr)} | {r.rounds} | "
                   f"{fmt_num(tp / scale if tp else None)} | {fmt_num(sp) + '×' if sp else '–'} |")
    out.append("")
    return out


# -- targets --------------------------------------------------------------------------------------
def _matches(info: dict, where: dict) -> bool:
    for key, want in where.items():
        if key.endswith("__min"):
            v = info.get(key[:-5])
            if v is None or v < want:
                return False
            continue
        v = info.get(key)
        if isinstance(want, tuple):
            if v not in want:
                return False
        elif v != want:
            return False
    return True


def evaluate(target: Target, run: Run) -> dict:
    """Per matched group the reached figure; the verdict over all of them."""
    reached = []   # (group, value)
    for group, rows in run.rows.items():
        row = rows.get(target.method)
        if row is None or not _matches(row.info, target.where):
            continue
        if target.kind == "speedup":
            peer = rows.get(target.peer)
            if peer is not None:
                reached.append((group, peer.median / row.median))
        elif target.kind == "tflops":
            if row.throughput is not None:
                reached.append((group, row.throughput / 1e12))
        elif target.kind == "time_ratio":
            twin = run.rows.get(row.info.get("twin", ""), {}).get(target.method)
            if twin is not None:
                reached.append((group, row.median / twin.median))
    lower_is_better = target.kind == "time_ratio"
    ok = [(v <= target.goal) if lower_is_better else (v >= target.goal) for _, v in reached]
    res = {"n": len(reached), "met": sum(ok), "values": reached}
    if reached:
        vals = [v for _, v in reached]
        worst = max(reached, key=lambda gv: gv[1]) if lower_is_better else min(reached, key=lambda gv: gv[1])
        res.update(min=min(vals), median=statistics.median(vals), max=max(vals), worst=worst[0])
        res["verdict"] = "met" if all(ok) else "MISSED"
    else:
        res["verdict"] = "not measured"
    return res


def targets_table(run: Run) -> list[str]:
    out = ["## Targets vs reached", "",
           "Each target is checked in every group it covers; `reached` is min / median / max over those "
           "groups (for time ratios lower is better), `met` counts the groups that meet it.", "",
           "| issue | target | method | vs | goal | groups | reached (min / median / max) | met | verdict | worst group |",
           "|---|---|---|---|---:|---:|---|---:|---|---|"]
    present = {r.info.get("device_type") for rows in run.rows.values() for r in rows.values()}
    skipped = [t for t in TARGETS if t.where.get("device_type") not in present]
    for t in TARGETS:
        if t in skipped:
            continue
        r = evaluate(t, run)
        if t.kind == "speedup":
            goal, vs = f"≥ {t.goal:.3g}×", t.peer
        elif t.kind == "tflops":
            goal, vs = f"≥ {t.goal:g} TFLOP/s", "–"
        else:
            goal, vs = f"≤ {t.goal:g}× time", "same call unpadded"
        reached = (f"{fmt_num(r['min'])} / {fmt_num(r['median'])} / {fmt_num(r['max'])}" if r["n"] else "–")
        verdict = {"met": "met", "MISSED": "**MISSED**", "not measured": "not measured"}[r["verdict"]]
        out.append(f"| {t.issue} | {t.what} | {t.method} | {vs} | {goal} | {r['n']} | {reached} | "
                   f"{r['met']}/{r['n']} | {verdict} | {('`' + r['worst'] + '`') if r['n'] else ''} |")
    if skipped:
        issues = sorted({t.issue for t in skipped})
        out += ["", f"({len(skipped)} targets of issue(s) {', '.join(map(str, issues))} are for a device with no "
                "results in this run and are not listed.)"]
    out.append("")
    return out


# -- sweeps: one line per family, and the machine's limits ---------------------------------------------
def _rate(row: Row) -> tuple[float | None, str]:
    """What a row reached: GB/s when it declares the bytes it reads, else GFLOP/s (TFLOP/s on a GPU)."""
    if row.info.get("bytes") and row.median > 0:
        return row.info["bytes"] / row.median / 1e9, "GB/s"
    tp = row.throughput
    if tp is None:
        return None, ""
    return (tp / 1e12, "TFLOP/s") if row.gpu else (tp / 1e9, "GFLOP/s")


def sweep_summary(run: Run) -> list[dict]:
    """Per family (extra_info["sweep"], machine limits aside) and fastattn method: the lowest ratio
    time(peer) / time(method) across the family's groups, where it happened, the median, how many groups
    reach the family's target ratio (extra_info["target_ratio"]), and the throughput reached there
    and at best."""
    fams: "OrderedDict[tuple, list]" = OrderedDict()
    for group, rows in sorted(run.rows.items(), key=lambda kv: _sort_key(*kv)):
        for row in rows.values():
            sweep = row.info.get("sweep")
            if not sweep or sweep == LIMITS or row.info.get("is_baseline") or row.method == row.info.get("baseline"):
                continue
            ratio = speedup(rows, row)
            if ratio is not None:
                fams.setdefault((sweep, row.method), []).append((group, ratio, row))
    out = []
    for (sweep, method), items in fams.items():
        group, low, row = min(items, key=lambda it: it[1])
        target = row.info.get("target_ratio")
        rates = [(_rate(r), g) for g, _, r in items]
        best = max((rt for rt in rates if rt[0][0] is not None), key=lambda rt: rt[0][0], default=None)
        out.append({"sweep": sweep, "method": method, "groups": len(items), "lowest": low, "worst": group,
                    "median": statistics.median(r for _, r, _ in items), "target": target,
                    "met": None if target is None else sum(r >= target for _, r, _ in items),
                    "rate_at_worst": _rate(row), "best_rate": best[0] if best else (None, ""),
                    "best_group": best[1] if best else ""})
    return out


def sweep_table(run: Run) -> list[str]:
    summary = sweep_summary(run)
    if not summary:
        return []
    out = ["## Sweeps: lowest ratio per family", "",
           "ratio = time(peer) / time(method) in each group of the family; `lowest` is the minimum over "
           "the family's groups (the row that decides whether the family meets its target).", "",
           "| family | method | groups | lowest ratio | at | median | target | met | reached there | best reached |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for f in summary:
        (rw, uw), (rb, ub) = f["rate_at_worst"], f["best_rate"]
        target = f"≥ {f['target']:.3g}×" if f["target"] is not None else "–"
        met = f"{f['met']}/{f['groups']}" if f["met"] is not None else "–"
        out.append(f"| {f['sweep']} | {f['method']} | {f['groups']} | {fmt_num(f['lowest'])}× | `{f['worst']}` | "
                   f"{fmt_num(f['median'])}× | {target} | {met} | {fmt_num(rw)} {uw} | {fmt_num(rb)} {ub} |")
    out.append("")
    return out


def limits_table(run: Run) -> list[str]:
    rows = [r for grp in run.rows.values() for r in grp.values() if r.info.get("sweep") == LIMITS]
    if not rows:
        return []
    out = ["## Machine limits (measured in the same run)", "",
           "| limit | method | median | reached |", "|---|---|---:|---:|"]
    for r in rows:
        rate, unit = _rate(r)
        out.append(f"| {r.info.get('limit', r.group)} | {r.method} | {fmt_time(r.median)} | {fmt_num(rate)} {unit} |")
    out.append("")
    return out


# -- plots ----------------------------------------------------------------------------------------
def plots(run: Run, plot_dir: str) -> list[tuple[str, str]]:
    """One PNG per (device, op): a panel per family; speedup vs the peer per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    by_kind: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for group, rows in sorted(run.rows.items(), key=lambda kv: _sort_key(*kv)):
        info = next(iter(rows.values())).info
        if info.get("sweep") == LIMITS:
            continue   # no peer to plot a speedup against: the limits have their own table
        kind = ("gpu" if info.get("device_type") == "cuda" else "cpu", info.get("op", "other"))
        by_kind[kind][info.get("family", group)].append((group, rows))
    written = []
    for (dev, op), families in by_kind.items():
        n = len(families)
        ncols = min(4, n)
        nrows = math.ceil(n / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
        for ax, (family, groups) in zip(axes.flat, families.items()):
            methods = []
            for _, rows in groups:
                methods += [m for m in rows if m not in methods]
            if len(groups) > 1 and all("x" in next(iter(r.values())).info for _, r in groups):
                for m in methods:
                    pts = [(next(iter(r.values())).info["x"], speedup(r, r[m])) for _, r in groups if m in r]
                    pts = [(x, s) for x, s in pts if s is not None]
                    if pts:
                        xs, ys = zip(*sorted(pts))
                        ax.plot(xs, ys, marker="o", label=m)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(next(iter(groups[0][1].values())).info.get("x_name", "x"))
            else:
                for gi, (_, rows) in enumerate(groups):
                    vals = [(m, speedup(rows, rows[m])) for m in methods if m in rows]
                    vals = [(m, s) for m, s in vals if s is not None]
                    ax.bar([m for m, _ in vals], [s for _, s in vals], color=[f"C{methods.index(m)}" for m, _ in vals])
                    ax.tick_params(axis="x", labelrotation=30, labelsize=7)
                    for lab in ax.get_xticklabels():
                        lab.set_horizontalalignment("right")
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_title(family, fontsize=8)
            ax.set_ylabel("speedup vs peer (×)")
            if len(groups) > 1:
                ax.legend(fontsize=6)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(plot_dir, f"{dev}-{op}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append((f"{dev} {op}", path))
    return written


# -- the document ---------------------------------------------------------------------------------
def header(run: Run, title: str | None) -> list[str]:
    infos = [r.info for rows in run.rows.values() for r in rows.values()]
    devices = sorted({f"{i.get('device_name')}" + (f" (sm {i['compute_capability']}, CUDA {i.get('cuda')})"
                                                    if i.get("compute_capability") else "")
                      for i in infos if i.get("device_type") == "cuda"})
    cpus = sorted({f"{i.get('device_name')}, {i.get('threads')} torch threads" for i in infos
                   if i.get("device_type") == "cpu"})
    torch_v = sorted({str(i.get("torch")) for i in infos if i.get("torch")})
    triton_v = sorted({str(i.get("triton")) for i in infos if "triton" in i})
    if not infos:   # no results: say at least what the machine writing the report has
        try:
            import torch
            torch_v = [f"{torch.__version__} (here, no results)"]
            import triton
            triton_v = [f"{triton.__version__} (here)"]
        except Exception:  # noqa: BLE001 - versions are a nicety
            pass
    if not title:
        title = "fastattn benchmarks — " + (", ".join(d.split(" (")[0] for d in devices) if devices else
                                             (cpus[0].split(",")[0] if cpus else "no results"))
    out = [f"# {title}", ""]
    if devices:
        out.append(f"- GPU: {'; '.join(devices)}")
    if cpus:
        out.append(f"- CPU: {'; '.join(cpus)}")
    if not devices and not cpus and run.machine:
        out.append(f"- machine: {'; '.join(sorted(set(run.machine)))}")
    out.append(f"- torch {', '.join(torch_v) or '?'}; triton {', '.join(triton_v) or '?'}")
    out.append(f"- run: {', '.join(sorted(set(run.datetimes))) or '?'}; report written "
               f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    if run.commits:
        out.append(f"- commit: {', '.join(sorted(set(run.commits)))}")
    if run.rows:
        out.append(f"- raw data: {', '.join(os.path.basename(p) for p in run.sources)} (pytest-benchmark JSON)")
    if run.replaced:
        out.append(f"- {run.replaced} (group, method) pairs appeared in more than one file; the last one is shown")
    out += ["", "Times are medians of one call (GPU calls synchronize inside the timed call). A ratio holds "
            "only against a peer measured in the same run on the same machine.", ""]
    return out


def render(run: Run, out_path: str, plot_dir: str | None, notes: list[str], title: str | None) -> str:
    lines = header(run, title)
    for note in notes:
        with open(note) as f:
            lines += [f.read().rstrip(), ""]
    if not run.rows:
        lines += ["**No benchmark results in the input.**", ""]
    lines += targets_table(run)
    lines += sweep_table(run)
    lines += limits_table(run)
    if plot_dir and run.rows:
        lines += ["## Plots", ""]
        base = os.path.dirname(os.path.abspath(out_path))
        for label, path in plots(run, plot_dir):
            lines += [f"![{label}]({os.path.relpath(os.path.abspath(path), base)})", ""]
    lines += ["## Groups", ""]
    for group, rows in sorted(run.rows.items(), key=lambda kv: _sort_key(*kv)):
        lines += group_table(group, rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--plots", help="directory for PNG plots (none when not given)")
    ap.add_argument("--notes", action="append", default=[], help="markdown file inserted after the header")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    missing = [p for p in args.json if not os.path.exists(p)]
    if missing:
        print(f"report.py: argument json: no such file {missing}", file=sys.stderr)
        return 2
    run = load(args.json)
    text = render(run, args.out, args.plots, args.notes, args.title)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    n = sum(len(r) for r in run.rows.values())
    print(f"report.py: {len(run.rows)} groups, {n} rows -> {args.out}"
          + (f", plots in {args.plots}" if args.plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
