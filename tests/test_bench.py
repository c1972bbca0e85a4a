"""The GPU benchmark's code path runs on CPU with a tiny model (the numbers themselves come from a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_gpu_runs_on_cpu_tiny(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "scripts/bench_gpu.py", "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "bench_gpu_cpu.json").read_text())
    rows = report["rows"]
    assert {(r["engine"], r["policy"]) for r in rows} == {
        ("hf_generate", "full"),
        ("kvbench", "full"),
        ("kvbench", "snapkv"),
        ("kvbench", "h2o"),
        ("kvbench", "streaming_llm"),
    }
    assert {r["batch"] for r in rows} == {1, 2}
    for row in rows:
        assert row["ms_per_step"] > 0 and row["roofline_ms"] > 0 and row["examples_per_s"] > 0
    snapkv = next(r for r in rows if r["policy"] == "snapkv")
    assert 0.25 < snapkv["kept_fraction"] < 0.5
    assert report["copy_bandwidth_gb_s"] > 0
