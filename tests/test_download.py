"""``kvbench download``: every source fetched from a local stand-in server, checked by sha256, then found by the
tasks without ``data_dir``; LongBench's zip goes through the real ``huggingface_hub`` client into the hub cache."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.download import ESSAYS
from kvbench.tasks.longbench import REVISION
from tests.hubserver import Hub
from tests.tasks.test_longbench_hub import data_zip

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(data_dir):
    with Hub() as server:
        server.add("dataset", "THUDM/LongBench", {"data.zip": data_zip(data_dir)}, commit=REVISION)
        for name in ESSAYS:
            server.static[f"/essays/{name}"] = (data_dir / "haystack" / "PaulGrahamEssays" / name).read_bytes()
        server.static["/ruler_essays.json"] = (data_dir / "haystack" / "ruler_PaulGrahamEssays.json").read_bytes()
        for name in ("squad", "hotpotqa"):
            server.static[f"/{name}.json"] = gzip.decompress((data_dir / "ruler" / f"{name}.json.gz").read_bytes())
        yield server


def env_for(server: Hub, tmp_path: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("KVBENCH_DATA_DIR", "HF_HUB_OFFLINE")}
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_ENDPOINT": server.endpoint,
        "HF_HOME": str(tmp_path / "hf"),
        "KVBENCH_CACHE": str(tmp_path / "cache"),
        "KVBENCH_ESSAYS_URL": f"{server.endpoint}/essays",
        "KVBENCH_RULER_ESSAYS_URL": f"{server.endpoint}/ruler_essays.json",
        "KVBENCH_SQUAD_URL": f"{server.endpoint}/squad.json",
        "KVBENCH_HOTPOTQA_URL": f"{server.endpoint}/hotpotqa.json",
    }


def kvbench(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvbench", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_download_all_then_tasks_run_without_data_dir(sources, data_dir, tmp_path):
    env, cwd = env_for(sources, tmp_path), tmp_path / "work"  # no ../shared/data beside this folder
    cwd.mkdir()
    done = kvbench(env, cwd, "download", "all")
    assert done.returncode == 0, done.stderr
    root = tmp_path / "cache" / "data"
    for name in ESSAYS:
        assert (root / "haystack" / "PaulGrahamEssays" / name).read_bytes() == (
            data_dir / "haystack" / "PaulGrahamEssays" / name
        ).read_bytes()
    for name in ("squad", "hotpotqa"):
        assert (root / "ruler" / f"{name}.json").read_bytes() == sources.static[f"/{name}.json"]
    assert list((tmp_path / "hf").rglob("data.zip"))

    offline = {**env, "HF_HUB_OFFLINE": "1"}
    for task in ("needle", "ruler/qa_1", "longbench/multi_news"):
        results = tmp_path / "results" / task.replace("/", "_")
        run = kvbench(offline, cwd, "model=tiny_random_llama", "limit=1", f"task={task}", f"results_dir={results}")
        assert run.returncode == 0, run.stderr
        (row,) = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
        assert row["n_examples"] == 1, task


def test_a_second_download_fetches_nothing(sources, tmp_path):
    env, cwd = env_for(sources, tmp_path), tmp_path
    assert kvbench(env, cwd, "download", "haystack").returncode == 0
    before = sum(sources.requests.values())
    assert kvbench(env, cwd, "download", "haystack").returncode == 0
    assert sum(sources.requests.values()) == before


def test_checksum_mismatch_is_one_line_and_writes_nothing(sources, tmp_path):
    env = {**env_for(sources, tmp_path), "KVBENCH_SQUAD_URL": f"{sources.endpoint}/hotpotqa.json"}
    done = kvbench(env, tmp_path, "download", "ruler")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "sha256" in lines[0] and "ruler/squad.json" in lines[0]
    assert not (tmp_path / "cache" / "data" / "ruler").exists()
