"""Sweeps on a real Slurm cluster (``make test-slurm``: the one-node cluster of scripts/slurm.sh on this machine).

Not part of plain ``pytest`` (``-m 'not slurm'`` in pyproject.toml); ``pytest -m slurm`` runs them and starts the
cluster itself if it is not up. When Slurm cannot start, the tests fail: they never skip or fall back to
running the jobs locally (every row must carry the Slurm job id it ran under).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbench.store import ResultStore, read_lines

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
SLURM_SH = str(REPO / "scripts" / "slurm.sh")
SLURM_DIR = Path(os.environ.get("KVBENCH_SLURM_DIR", "/tmp/kvbench-slurm"))
# Small jobs, so that two share the 2-CPU test node; no GPUs there.
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=60",  # submitit counts a signal in the last 20% (or 10 min) as a time-out
]
TINY = ["model=tiny_random_llama", "progress=false"]


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """The environment for Slurm clients; starts the cluster (and stops it afterwards) if it is not up."""
    env = {**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", str(SLURM_DIR / "slurm.conf"))}
    env["KVBENCH_SLURM_DIR"] = str(SLURM_DIR)
    env["HYDRA_FULL_ERROR"] = "1"
    started = False
    if subprocess.run([SLURM_SH, "status"], env=env, capture_output=True).returncode != 0:
        up = subprocess.run([SLURM_SH, "up"], env=env, capture_output=True, text=True, timeout=900)
        started = True
        if up.returncode != 0:
            subprocess.run([SLURM_SH, "down"], env=env)
            pytest.fail(f"the one-node Slurm cluster did not start (scripts/slurm.sh up):\n{up.stdout}\n{up.stderr}")
    info = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
    if info.returncode != 0 or not info.stdout.strip():
        pytest.fail(f"sinfo does not answer with SLURM_CONF={env['SLURM_CONF']}:\n{info.stderr}")
    yield env
    if started:
        subprocess.run([SLURM_SH, "down"], env=env)


def submitit_logs(results: Path) -> str:
    logs = sorted(results.glob(".hydra/*/.submitit/*/*_log.*"))
    return "\n".join(f"--- {log}\n{log.read_text(errors='replace')[-6000:]}" for log in logs) or "(no submitit logs)"


@contextlib.contextmanager
def sweep(args: list[str], results: Path, data_dir: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """Run a Slurm sweep in the background; on any failure print its output and its jobs' logs; cancel its
    jobs at the end."""
    name = f"kvbench-test-{results.name}"
    cmd = [sys.executable, "-m", "kvbench", "-m", f"data_dir={data_dir}", f"results_dir={results}"]
    cmd += [*LAUNCHER, f"hydra.launcher.name={name}", *args]
    output = results / "sweep.log"
    results.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.job_name = name  # type: ignore[attr-defined]
    try:
        yield process
    except BaseException:
        print(f"$ {' '.join(cmd)}\n{output.read_text()[-8000:]}\n{submitit_logs(results)}")
        print(subprocess.run(["squeue"], env=env, capture_output=True, text=True).stdout)
        subprocess.run(["scancel", "-n", name], env=env, capture_output=True)
        raise
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def finish(process: subprocess.Popen, timeout: float = 240) -> None:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the sweep did not finish within {timeout} s")
    assert process.returncode == 0, f"the sweep failed with status {process.returncode}"


def slurm_job(job_id: str, env: dict[str, str], timeout: float = 60) -> str:
    """``scontrol show job`` once the job has ended (its result comes back before its process exits)."""
    deadline = time.time() + timeout
    while True:
        show = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
        if time.time() > deadline or not re.search(r"JobState=(PENDING|RUNNING|COMPLETING|CONFIGURING)", show):
            return show
        time.sleep(0.5)


def test_grid_runs_as_slurm_jobs(slurm, tmp_path, data_dir):
    """Two policies x two budgets through hydra/launcher=slurm: one array task per point, rows in one place."""
    args = [*TINY, "+policy=streaming_llm,snapkv", "budget=0.3,0.5", "limit=1"]
    with sweep(args, tmp_path, data_dir, slurm) as process:
        finish(process)
        rows = ResultStore(tmp_path).rows()
        assert len(rows) == 4 * 1  # 4 points x the 1 task of task=passkey
        assert len({row["config_hash"] for row in rows}) == 4
        assert {(row["policy"], row["budget"]) for row in rows} == {
            (policy, budget) for policy in ("streaming_llm", "snapkv") for budget in (0.3, 0.5)
        }
        (sweep_dir,) = tmp_path.glob(".hydra/multirun_*")
        assert {row["sweep_id"] for row in rows} == {sweep_dir.name}
        job_ids = {row["slurm_job_id"] for row in rows}
        assert None not in job_ids and len(job_ids) == 4, job_ids
        for job_id in job_ids:  # jobs slurmctld ran, not local processes
            show = slurm_job(job_id, slurm)
            assert "JobState=COMPLETED" in show, show


def test_preempted_packed_job_is_requeued_and_resumes(slurm, tmp_path, data_dir):
    """Two points packed in one job; the job is signalled mid-way as on preemption, is requeued by submitit,
    and its second run resumes: every row once, every prediction once."""
    args = [*TINY, "+policy=full", "budget=1.0", "seed=0,1", "limit=2", "task.max_new_tokens=16"]
    predictions = tmp_path / "predictions"
    with sweep([*args, "hydra.launcher.pack=2"], tmp_path, data_dir, slurm) as process:
        deadline = time.time() + 180
        while time.time() < deadline and not any(read_lines(path) for path in predictions.glob("*.jsonl")):
            assert process.poll() is None, "the sweep ended before its job could be preempted"
            time.sleep(0.2)
        jobs = subprocess.run(["squeue", "-h", "-n", process.job_name, "-o", "%i"], env=slurm, capture_output=True)
        (job,) = jobs.stdout.decode().split()
        # The signal submitit acts on (sbatch --signal, sent signal_delay_s before the time limit; submitit's own
        # preemption test helper sends it too); this early in the job, submitit takes it as a preemption.
        subprocess.run(["scancel", "--signal=USR2", job], env=slurm, check=True)
        # A requeued job may start again only ~2 minutes later (its BeginTime); let it start now.
        while time.time() < deadline and process.poll() is None:
            state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=slurm, capture_output=True, text=True)
            if state.stdout.strip() == "PENDING":
                subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=slurm, check=True)
                break
            time.sleep(0.2)
        finish(process)
        logs = submitit_logs(tmp_path)
        assert "this job is preempted" in logs and re.search(r"Requeued job \S+", logs), logs
        show = slurm_job(job, slurm)
        assert "JobState=COMPLETED" in show and "Restarts=1" in show, show
        rows = ResultStore(tmp_path).rows()
        assert len(rows) == len({row["config_hash"] for row in rows}) == 2
        assert all(row["n_examples"] == 2 for row in rows)
        assert len({row["slurm_job_id"] for row in rows}) == 1 and rows[0]["slurm_job_id"] is not None
        for row in rows:
            ids = [record["id"] for record in read_lines(predictions / f"{row['config_hash']}.jsonl")]
            assert len(ids) == len(set(ids)) == 2
