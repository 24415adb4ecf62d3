"""The tile choice of the Triton kernels (kernels/configs.py): a table lookup, reproducible across
processes, overridable by a tuning run's table, and never timed inside an op."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
_DUMP = ("import json; from fastattn.kernels import configs as C; "
         "print(json.dumps([[list(k), str(t)] for k, t in sorted(C.ATTENTION.items()) + sorted(C.FFN.items())]))")


def _tables(**env) -> list:
    e = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTATTN_TRITON_CONFIGS")}
    proc = subprocess.run([sys.executable, "-c", _DUMP], cwd=ROOT, env=dict(e, **env), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_a_tuned_table_overrides_only_the_keys_it_names(tmp_path):
    table = tmp_path / "tuned.json"
    table.write_text(json.dumps([{"key": ["fwd", "f16", 64, "long", "plain", 90], "tile": "128x32 w4 s2"},
                                 {"key": ["up", "f16", "aligned", "large", 80], "tile": "64x128x64 w4 s3 split2"}]))
    base = dict(map(lambda r: (tuple(r[0]), r[1]), _tables()))
    tuned = dict(map(lambda r: (tuple(r[0]), r[1]), _tables(FASTATTN_TRITON_CONFIGS=str(table))))
    changed = {k for k in base if base[k] != tuned[k]}
    assert changed == {("fwd", "f16", 64, "long", "plain", 90), ("up", "f16", "aligned", "large", 80)}
    assert tuned["fwd", "f16", 64, "long", "plain", 90] == "128x32 w4 s2"
    assert tuned["up", "f16", "aligned", "large", 80] == "64x128x64 w4 s3 split2"


def test_the_ops_never_time_or_autotune():
    # timing inside an op breaks CUDA-graph capture and makes the choice differ between processes
    for name in ("attention.py", "feed_forward.py", "configs.py"):
        text = (ROOT / "kernels" / name).read_text()
        for word in ("do_bench", "triton.autotune", "triton.testing"):
            assert word not in text, f"kernels/{name} uses {word}"


def test_the_tuning_run_refuses_without_a_gpu(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "fastattn.kernels.tune", "--out", str(tmp_path / "t.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "t.json").exists()
