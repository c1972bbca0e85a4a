"""LongBench from the hub: the real ``huggingface_hub`` client downloads ``data.zip`` from a local stand-in server
(``HF_ENDPOINT``), rows record the revision, ``HF_HUB_OFFLINE=1`` reads the cache, failures are one line."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvbench.tasks.longbench import REVISION
from tests.hubserver import Hub

REPO = Path(__file__).resolve().parents[2]
LOCAL_TASKS = ["multi_news", "multifieldqa_zh", "passage_retrieval_zh"]


def data_zip(data_dir: Path) -> bytes:
    """A LongBench-layout archive (``data/<task>.jsonl``) of the three real tasks' files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for task in LOCAL_TASKS:
            archive.writestr(f"data/{task}.jsonl", (data_dir / "longbench" / f"{task}.jsonl").read_bytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hub(data_dir):
    with Hub() as server:
        server.add("dataset", "THUDM/LongBench", {"data.zip": data_zip(data_dir)}, commit=REVISION)
        yield server


def env_for(hub: Hub, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    return {**env, **extra}


def kvbench(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvbench", "model=tiny_random_llama", "limit=1", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def records_via_task(env: dict[str, str], task: str, data_dir: Path, source: str = "auto") -> list[dict]:
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom kvbench.tasks.longbench import LongBenchTask\n"
        f"t = LongBenchTask(subset={task!r}, source={source!r})\nt.check_data(Path({str(data_dir)!r}))\n"
        f"print(json.dumps([t.data_revision, t._records(Path({str(data_dir)!r}))]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_hub_records_equal_the_local_files(task, hub, data_dir, tmp_path):
    revision, records = records_via_task(env_for(hub, tmp_path), task, tmp_path / "missing")
    lines = (data_dir / "longbench" / f"{task}.jsonl").read_bytes().splitlines()
    assert records == [json.loads(line) for line in lines]
    assert revision == REVISION


def test_local_file_wins_and_hub_source_skips_it(hub, data_dir, tmp_path):
    before = hub.requests.copy()
    revision, records = records_via_task(env_for(hub, tmp_path), "multi_news", data_dir)
    assert revision is None and len(records) == 200 and hub.requests == before
    revision, _ = records_via_task(env_for(hub, tmp_path), "multi_news", data_dir, source="hub")
    assert revision == REVISION and hub.requests != before


def test_cli_row_from_the_hub_then_offline_from_the_cache(hub, data_dir, tmp_path):
    env = env_for(hub, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    hub_run = kvbench(env, "task=longbench/multi_news", f"data_dir={empty}", f"results_dir={tmp_path / 'hub'}")
    assert hub_run.returncode == 0, hub_run.stderr
    local_run = kvbench(env, "task=longbench/multi_news", f"data_dir={data_dir}", f"results_dir={tmp_path / 'local'}")
    assert local_run.returncode == 0, local_run.stderr
    (hub_row,) = read_jsonl(tmp_path / "hub" / "results.jsonl")
    (local_row,) = read_jsonl(tmp_path / "local" / "results.jsonl")
    assert hub_row["task"] == "longbench/multi_news" and hub_row["n_examples"] == 1
    assert hub_row["data_revision"] == REVISION and local_row["data_revision"] is None
    assert hub_row["score"] == local_row["score"]
    assert predictions(tmp_path / "hub") == predictions(tmp_path / "local")

    asked = sum(hub.requests.values())
    offline = kvbench(
        {**env, "HF_HUB_OFFLINE": "1"}, "task=longbench/multi_news", f"data_dir={tmp_path / 'nowhere'}",
        f"results_dir={tmp_path / 'offline'}",
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    assert sum(hub.requests.values()) == asked
    (offline_row,) = read_jsonl(tmp_path / "offline" / "results.jsonl")
    assert offline_row["data_revision"] == REVISION and offline_row["score"] == hub_row["score"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task=longbench/qasper"], "has no data/qasper.jsonl"),
        (["task=longbench/multi_news", "task.revision=0000000000000000000000000000000000000000"], "no revision"),
    ],
)
def test_missing_member_or_revision_is_one_line_before_the_model_loads(args, message, hub, tmp_path):
    results = tmp_path / "results"
    done = kvbench(env_for(hub, tmp_path), *args, f"data_dir={tmp_path}", f"results_dir={results}")
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kvbench: error: task 'longbench/") and message in lines[0]
    assert not (results / "results.jsonl").exists()


def test_404_and_offline_miss_are_one_line(tmp_path):
    with Hub() as empty_hub:  # no THUDM/LongBench at all: a 404 for data.zip
        done = kvbench(env_for(empty_hub, tmp_path), "task=longbench/multi_news", f"data_dir={tmp_path}")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "longbench/multi_news" in lines[0] and "THUDM/LongBench" in lines[0] and "HF_TOKEN" in lines[0]
    offline = kvbench(
        {**env_for(empty_hub, tmp_path), "HF_HUB_OFFLINE": "1"}, "task=longbench/multi_news", f"data_dir={tmp_path}"
    )
    lines = [line for line in offline.stderr.splitlines() if line.strip()]
    assert offline.returncode == 2 and len(lines) == 1, offline.stderr
    assert "HF_HUB_OFFLINE=1" in lines[0] and "kvbench download" in lines[0] and "data.zip" in lines[0]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def predictions(results: Path) -> list[str]:
    (path,) = (results / "predictions").glob("*.jsonl")
    return [record["prediction"] for record in read_jsonl(path)]
