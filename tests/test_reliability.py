"""No silently wrong score: failed points, up-front validation, context limits, damage, locks (issue 17)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from kvbench import runner, schema
from kvbench.batching import encode
from kvbench.errors import UserError
from kvbench.store import ResultStore
from kvbench.tasks.passkey import PasskeyTask

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random_llama", "+policy=full", "budget=1.0", "progress=false", "limit=1", "task.max_new_tokens=4"]


def kvbench(*args: str, data_dir: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    flags = [arg for arg in args if arg.startswith("-")]
    cmd = [sys.executable, "-m", "kvbench", *flags, f"data_dir={data_dir}", *[a for a in args if a not in flags]]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def live_tensor_bytes() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore")
        return sum(o.numel() * o.element_size() for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_point_out_of_memory_is_a_failed_row_and_frees_its_memory(make_config, monkeypatch):
    monkeypatch.setenv(runner.FAULT_ENV, "1")
    (ok,) = runner.run(make_config(*TINY, "seed=0"))
    baseline = live_tensor_bytes()
    (failed,) = runner.run(make_config(*TINY, "seed=1"))
    assert failed["status"] == "failed" and failed["reason"].startswith("MemoryError: simulated out of memory")
    assert live_tensor_bytes() <= baseline  # nothing of the failed forward is still referenced
    if torch.cuda.is_available():
        assert torch.cuda.memory_reserved() == torch.cuda.memory_allocated()
    (after,) = runner.run(make_config(*TINY, "seed=2"))
    assert ok["status"] == after["status"] == "ok"


def test_sweep_survives_an_out_of_memory_point_and_rerun_retries_it(tmp_path, data_dir):
    args = ["-m", *TINY, "seed=0,1,2", f"results_dir={tmp_path}"]
    done = kvbench(*args, data_dir=data_dir, env={runner.FAULT_ENV: "1"})
    assert done.returncode != 0
    rows = ResultStore(tmp_path).rows()
    assert sorted((row["seed"], row["status"]) for row in rows) == [(0, "ok"), (1, "failed"), (2, "ok")]
    (bad,) = [row for row in rows if row["status"] == "failed"]
    assert bad["reason"].startswith("MemoryError: simulated out of memory") and "\n" not in bad["reason"]
    report = subprocess.run([sys.executable, "-m", "kvbench.report", str(tmp_path)], capture_output=True, text=True)
    assert report.returncode == 1 and "| failed" in report.stdout and "MemoryError" in report.stdout
    assert kvbench(*args, data_dir=data_dir).returncode == 0  # the failed point is retried, the others skipped
    rows = ResultStore(tmp_path).rows()
    assert sorted((row["seed"], row["status"]) for row in rows) == [(0, "ok"), (1, "ok"), (2, "ok")]


def test_report_and_results_refuse_a_missing_dir(tmp_path):
    for module in ("kvbench.report", "kvbench.results"):
        done = subprocess.run([sys.executable, "-m", module, str(tmp_path / "nope")], capture_output=True, text=True)
        assert done.returncode == 2 and "does not exist" in done.stderr, module


def test_prompt_over_the_model_context_is_refused(make_config, tmp_path):
    # tiny_random_llama has max_position_embeddings=8192; before, a prompt ran past it and wrote a row.
    with pytest.raises(UserError, match=r"over its context of 8192 tokens \(max_position_embeddings\)"):
        runner.run(make_config(*TINY, "model.max_prompt_tokens=12000"))
    assert not (tmp_path / "results" / "results.jsonl").exists()


def test_longbench_truncation_is_recorded_per_example_and_in_the_row(make_config, tmp_path):
    (row,) = runner.run(make_config(*TINY, "task=longbench/multi_news", "model.max_prompt_tokens=300"))
    assert row["truncated_share"] == 1.0
    (record,) = ResultStore(tmp_path / "results").predictions(row["config_hash"]).values()
    assert record["n_prompt_tokens_original"] > 300 and record["n_prompt_tokens_kept"] == 300


def test_query_agnostic_without_the_question_in_the_prompt_is_an_error(tiny, data_dir):
    (example,) = list(PasskeyTask(lengths=[256], depths=[0.5], n_per_cell=1).examples(data_dir, tiny[1]))
    example.question = "a question that is not in the prompt"
    with pytest.raises(UserError, match=f"question of example {example.id} is not in its prompt"):
        encode(example, tiny[1], True, 2000, "query_agnostic")


def test_kv_bytes_are_per_example_whatever_the_batch_size(make_config, tmp_path):
    # Two passkey prompts of the same length: one batch of two or two batches of one hold the same per example.
    args = ["model=tiny_random_llama", "+policy=h2o", "budget=0.5", "progress=false", "limit=2"]
    args += ["task.max_new_tokens=4"]
    rows = [runner.run(make_config(*args, f"batch_size={n}", f"results_dir={tmp_path / str(n)}"))[0] for n in (1, 2)]
    for key in ("kv_bytes", "kv_payload_bytes", "kv_bytes_decode", "kv_bytes_full"):
        assert rows[0][key] == rows[1][key] > 0, key


def test_damaged_predictions_of_a_finished_row_are_reported_and_repaired(tmp_path, data_dir):
    args = [*TINY, "limit=2", f"results_dir={tmp_path}"]
    assert kvbench(*args, data_dir=data_dir).returncode == 0
    (row,) = ResultStore(tmp_path).rows()
    path = ResultStore(tmp_path).predictions_path(row["config_hash"])
    path.write_bytes(path.read_bytes()[:-20])  # a cut last line
    rerun = kvbench(*args, data_dir=data_dir)
    assert rerun.returncode == 0
    assert f"{path}:2: damaged line skipped" in rerun.stderr and "holds 1 of 2 examples" in rerun.stderr
    (repaired,) = ResultStore(tmp_path).rows()
    assert repaired["n_examples"] == 2 and len(ResultStore(tmp_path).predictions(row["config_hash"])) == 2
    assert repaired["timestamp"] >= row["timestamp"] and ResultStore(tmp_path).has_row(row["config_hash"])


def test_a_config_claimed_by_another_process_is_skipped_and_a_stale_claim_is_taken_over(make_config, capsys):
    cfg = make_config(*TINY)
    store = ResultStore(cfg.results_dir)
    key = schema.config_hash(cfg, runner.plan(cfg).tasks[0])
    claim = store.predictions_path(key).with_suffix(".claim.lock")
    claim.parent.mkdir(parents=True)
    holder = subprocess.Popen(  # another process computing the same config: it holds the claim
        [sys.executable, "-c", HOLD_CLAIM, str(claim)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert runner.run(cfg) == []
        assert "being computed by another process, skipped" in capsys.readouterr().out
        assert not store.predictions_path(key).exists() and not store.rows_path.exists()
    finally:
        holder.kill()
        holder.wait()
    (row,) = runner.run(cfg)  # the killed holder left its pid in the file: a stale claim, taken over
    assert row["status"] == "ok" and f"stale claim of pid {holder.pid}" in capsys.readouterr().out
    assert len(store.predictions(key)) == 1 and len(store.rows()) == 1


HOLD_CLAIM = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.write(str(os.getpid())); handle.flush()
print("held", flush=True)
time.sleep(600)
"""


def test_concurrent_first_runs_convert_the_model_once_and_leave_no_temporary_files(tmp_path):
    convert = "from kvbench.models import converted_dir, model_spec; "
    convert += "print(converted_dir(model_spec('smollm2_135m')))"
    env = {**os.environ, "KVBENCH_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", convert], env=env, cwd=REPO, stdout=subprocess.PIPE) for _ in "ab"]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert {out.strip() for out in outputs} == {str(tmp_path / "smollm2_135m").encode()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2_135m", "smollm2_135m.convert.lock"]
    assert (tmp_path / "smollm2_135m" / "model.safetensors").stat().st_size > 500e6


@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_a_damaged_longbench_file_is_one_line_naming_it_before_the_model_loads(damage, tmp_path, data_dir):
    local = tmp_path / "data" / "longbench"
    local.mkdir(parents=True)
    for name in ("dataset2prompt.json", "dataset2maxlen.json"):
        (local / name).write_bytes((data_dir / "longbench" / name).read_bytes())
    original = (data_dir / "longbench" / "multi_news.jsonl").read_bytes()
    (local / "multi_news.jsonl").write_bytes(original[:5000] if damage == "cut" else b"")
    out = kvbench("model=tiny_random_llama", "task=longbench/multi_news", f"results_dir={tmp_path / 'r'}",
                  data_dir=tmp_path / "data")  # fmt: skip
    assert out.returncode == 2 and "Loading weights" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "multi_news.jsonl" in lines[0], out.stderr
    assert not (tmp_path / "r").exists()
