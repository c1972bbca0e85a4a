"""The README's quick start, run line by line (issue 15): every command of its ``bash`` block, from a folder
outside the checkout, with the package installed from the checkout into a scratch folder."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvbench.tasks.longbench import REVISION
from tests.hubserver import Hub
from tests.tasks.test_longbench_hub import data_zip

REPO = Path(__file__).resolve().parents[1]
# The GPU step (an 8B model over LongBench) runs here on the tiny random model, one multi_news example, on CPU.
GPU_STEP = {"model=llama3_8b_instruct": "model=tiny_random_llama", "task=longbench": "task=longbench/multi_news"}


def quick_start() -> list[list[str]]:
    """The commands of the README's quick-start block, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_quick_start_is_the_four_steps_this_file_runs():
    assert [command[:2] for command in quick_start()] == [
        ["pip", "install"],
        ["kvbench", "download"],
        ["kvbench", "model=llama3_8b_instruct"],
        ["python", "-m"],
    ]


@pytest.fixture(scope="module")
def hub(data_dir):
    with Hub() as server:
        server.add("dataset", "THUDM/LongBench", {"data.zip": data_zip(data_dir)}, commit=REVISION)
        yield server


def test_the_quick_start_runs_top_to_bottom(hub, tmp_path):
    install, download, run, figures = quick_start()
    source, site, work = tmp_path / "clone", tmp_path / "site", tmp_path / "work"  # work has no ../shared beside
    shutil.copytree(REPO / "kvbench", source / "kvbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    work.mkdir()
    # `pip install .` in the clone; the test's venv already holds the dependencies, so it installs only kvbench.
    assert install == ["pip", "install", "."]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps"]
    subprocess.run([*pip, "--no-build-isolation", "--target", str(site), "."], cwd=source, check=True)
    env = {key: value for key, value in os.environ.items() if key not in ("KVBENCH_DATA_DIR", "HF_HUB_OFFLINE")}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"))

    def shell(command: list[str]) -> subprocess.CompletedProcess:
        if command[0] == "kvbench":
            command = [str(site / "bin" / "kvbench"), *command[1:]]
        elif command[0] == "python":
            command = [sys.executable, *command[1:]]
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    shell(download)
    assert list((tmp_path / "hf").rglob("data.zip"))
    env["HF_HUB_OFFLINE"] = "1"  # from here on the data come from the cache the download filled
    shell([GPU_STEP.get(arg, arg) for arg in run] + ["limit=1", "task.max_new_tokens=4"])
    out = work / "results" / "runs" / "quickstart"
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (row["task"], row["policy"], row["budget"], row["status"]) == ("longbench/multi_news", "snapkv", 0.3, "ok")
    assert row["data_revision"] == REVISION
    shell(figures)
    assert {".pdf", ".png"} <= {path.suffix for path in (out / "figures").iterdir()}
