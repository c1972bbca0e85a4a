"""Local sweeps (``python -m kvbench -m``): killed and rerun, every row once; packed points; submitit local."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvbench.runner import FAULT_ENV
from kvbench.store import ResultStore, read_lines

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random_llama", "+policy=full", "budget=1.0", "progress=false"]


def sweep_command(*args: str, results: Path, data_dir: Path) -> list[str]:
    return [sys.executable, "-m", "kvbench", "-m", f"data_dir={data_dir}", f"results_dir={results}", *args]


def sweep(*args: str, results: Path, data_dir: Path) -> subprocess.CompletedProcess:
    cmd = sweep_command(*args, results=results, data_dir=data_dir)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


def submitit_logs(results: Path) -> str:
    logs = sorted(results.glob(".hydra/*/.submitit/*/*_log.*"))
    return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-4000:]}" for log in logs)


def test_killed_sweep_reruns_to_every_row_once(tmp_path, data_dir):
    args = [*TINY, "seed=0,1,2", "limit=2", "task.max_new_tokens=32", "hydra.sweeper.params.sweep_id=fault"]
    store = ResultStore(tmp_path)
    predictions = tmp_path / "predictions"

    def partial() -> list[Path]:
        """Predictions files of points that started but have no row yet."""
        finished = {row["config_hash"] for row in store.rows()}
        return [path for path in predictions.glob("*.jsonl") if read_lines(path) and path.stem not in finished]

    cmd = sweep_command(*args, results=tmp_path, data_dir=data_dir)
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not (store.rows() and partial()):
        time.sleep(0.05)
    assert process.poll() is None, "the sweep ended before it could be killed mid-way"
    os.kill(process.pid, signal.SIGKILL)  # mid-way: one point done, the next one half done
    process.wait()

    before = {row["config_hash"]: row for row in store.rows()}
    half_done = {path.stem: path.read_bytes() for path in partial()}
    assert 1 <= len(before) < 3 and half_done, (before, half_done)

    done = sweep(*args, results=tmp_path, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-4000:]

    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    hashes = [row["config_hash"] for row in rows]
    assert len(rows) == len(set(hashes)) == 3
    assert sorted(row["seed"] for row in rows) == [0, 1, 2]
    assert all(row["n_examples"] == 2 and row["sweep_id"] == "fault" for row in rows)
    for key, row in before.items():  # finished points were skipped, not run again
        assert next(r for r in rows if r["config_hash"] == key) == row
    for key in hashes:
        path = store.predictions_path(key)
        ids = [record["id"] for record in read_lines(path)]
        assert len(ids) == len(set(ids)) == 2, path
        if key in half_done:  # resumed after what was on disk, not redone
            assert path.read_bytes().startswith(half_done[key].rsplit(b"\n", 1)[0])


def test_packed_local_sweep_runs_points_in_one_job_and_isolates_failures(tmp_path, data_dir):
    # Three points in one process; the middle one runs out of memory (simulated) and fails alone.
    args = ["hydra/launcher=local", "hydra.launcher.pack=3", *TINY, "seed=0,1,2", "limit=1"]
    cmd = sweep_command(*args, results=tmp_path, data_dir=data_dir)
    env = {**os.environ, FAULT_ENV: "1"}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    logs = submitit_logs(tmp_path)
    assert done.returncode != 0, done.stderr[-4000:]
    jobs = [path for path in tmp_path.glob(".hydra/*/.submitit/*") if path.name != "%j"]
    assert len(jobs) == 1, logs
    assert "MemoryError: simulated out of memory" in logs and "grid point #1 (" in logs, logs
    rows = ResultStore(tmp_path).rows()
    assert sorted((row["seed"], row["status"]) for row in rows) == [(0, "ok"), (1, "failed"), (2, "ok")], logs
    assert len({row["sweep_id"] for row in rows}) == 1 and rows[0]["sweep_id"].startswith("multirun_")
    assert all(row["slurm_job_id"] is None for row in rows)


def test_sweep_with_a_bad_point_is_refused_up_front(tmp_path, data_dir):
    # Validation happens for every point before the sweep starts: nothing runs, nothing is written.
    done = sweep("model=tiny_random_llama", "+policy=h2o", "budget=0.3,1.5,0.5", results=tmp_path, data_dir=data_dir)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: grid point #1 (") and "budget=1.5" in lines[0]
    assert "budget must be a fraction in (0, 1], got 1.5" in lines[0]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_submitit_local_launcher(tmp_path, data_dir):
    done = sweep("hydra/launcher=submitit_local", *TINY, "limit=1", results=tmp_path, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-4000:] + submitit_logs(tmp_path)
    (row,) = ResultStore(tmp_path).rows()
    assert row["n_examples"] == 1 and row["sweep_id"] == next(tmp_path.glob(".hydra/multirun_*")).name
