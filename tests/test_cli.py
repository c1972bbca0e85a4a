"""``python -m kvbench`` end to end: rows, bad input (one line, nothing written), kill-and-rerun resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbench.store import ResultStore

REPO = Path(__file__).resolve().parents[1]


def kvbench(*args: str, data_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kvbench", f"data_dir={data_dir}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, **kwargs)


BAD_INPUTS = [
    (["+policy=nope"], "unknown policy 'nope'; valid: "),
    (["+policy=chunkkv", "policy.scorer=corm", "budget=0.3"], "chunkkv: unknown scorer 'corm'; valid: "),
    (["model=gpt5"], "unknown model 'gpt5'; valid: "),
    (["task=nope"], "unknown task 'nope'; valid: "),
    (["+policy=full", "budget=0"], "budget must be a fraction in (0, 1], got 0"),
    (["+policy=full", "budget=1.5"], "budget must be a fraction in (0, 1], got 1.5"),
    (["task=needle", "data_dir=/nonexistent/data"], "task 'needle' needs the essays in /nonexistent/data"),
    (["model=llama2_7b_chat", "model.path=/nonexistent/llama"], "directory /nonexistent/llama does not exist"),
    (["model.gguf_package=not_installed_pkg"], "needs the package 'not_installed_pkg'"),
    (["attention=eager"], "unknown attention 'eager'; valid: sdpa, flash_attention_2"),
    (["attention=flash_attention_2"], "attention=flash_attention_2 needs the flash-attn package"),
    (["batch_size=0"], "batch_size must be at least 1, got 0"),
    (["batch_size=-1"], "batch_size must be at least 1, got -1"),
    (["chunk_size=0"], "chunk_size must be at least 1, got 0"),
    (["limit=abc"], "limit must be an integer or null, got 'abc'"),
    (["+policy=h2o", "budget_tokens=abc"], "budget_tokens must be an integer or null, got 'abc'"),
    (["+policy=h2o", "budget_tokens=2.7"], "budget_tokens must be an integer or null, got 2.7"),
    (["+policy=h2o", "budget=true"], "budget must be a number or null, got True"),
    (["+policy=snapkv", "budget=0.3", "policy.window=abc"], "policy.window must be an integer, got 'abc'"),
    (["+policy=snapkv", "budget=0.3", "policy.pooling=foo"], "unknown policy.pooling 'foo'; valid: max, avg"),
    (["task=passkey", "task.lengths=[20000]"], "task 'passkey' would be truncated: length 20000 is over model"),
    (["protocol=both"], "unknown protocol 'both'; valid: official, query_agnostic"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_and_nothing_written(args, message, tmp_path, data_dir):
    results = tmp_path / "results"
    done = kvbench(f"results_dir={results}", *args, data_dir=data_dir)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kvbench: error: ") and message in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not results.exists()  # nothing at all: no rows, no predictions, no .hydra/


def test_unknown_policy_lists_valid_names(tmp_path, data_dir):
    done = kvbench(f"results_dir={tmp_path}", "+policy=nope", data_dir=data_dir)
    assert "full" in done.stderr


def test_full_policy_writes_a_complete_row(tmp_path, data_dir):
    done = kvbench("+policy=full", "budget=1.0", "limit=2", f"results_dir={tmp_path}", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    (row,) = ResultStore(tmp_path).rows()
    for key in (
        "model", "policy", "policy_params", "budget", "task", "protocol", "n_examples", "score",
        "kv_kept_fraction", "kv_bytes", "peak_memory_bytes", "prefill_tokens_per_s", "decode_tokens_per_s",
        "ttft_s", "wall_s", "git_commit", "versions", "timestamp", "config_hash",
    ):  # fmt: skip
        assert row[key] is not None, key
    assert row["n_examples"] == 2 and row["policy"] == "full" and row["kv_kept_fraction"] == 1.0
    assert set(row["versions"]) == {"python", "torch", "transformers", "kvbench"}
    assert "| passkey" in done.stdout


def test_killed_run_resumes_without_duplicates(tmp_path, data_dir):
    args = ["model=tiny_random_llama", "limit=3", f"results_dir={tmp_path}", "task.max_new_tokens=64"]
    cmd = [sys.executable, "-m", "kvbench", f"data_dir={data_dir}", *args]
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = tmp_path / "predictions"
    deadline = time.time() + 300
    while time.time() < deadline and not any(p.stat().st_size for p in predictions.glob("*.jsonl")):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (first,) = predictions.glob("*.jsonl")
    done_before = len(first.read_text().splitlines())
    assert 1 <= done_before < 3 and not (tmp_path / "results.jsonl").exists()
    assert kvbench(*args, data_dir=data_dir).returncode == 0
    assert kvbench(*args, data_dir=data_dir).returncode == 0
    rows = ResultStore(tmp_path).rows()
    assert len(rows) == 1 and rows[0]["n_examples"] == 3
    ids = [json.loads(line)["id"] for line in first.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 3


def test_help_says_what_kvbench_is_and_offers_only_real_choices():
    console_script = [sys.executable, "-c", "from kvbench.__main__ import cli; cli()"]  # what `kvbench` runs
    for cmd in ([sys.executable, "-m", "kvbench", "--help"], [*console_script, "--help"]):
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        text = done.stdout
        assert text.startswith("kvbench: benchmark KV-cache eviction policies.")
        assert "kvbench +policy=snapkv budget=0.3 task=needle" in text  # the README's example
        assert "kvbench download <longbench|haystack|ruler|all>" in text
        choices = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and "NAME " in line}
        assert {"+policy=NAME", "task=NAME", "model=NAME", "logger=NAME", "+experiment=NAME"} <= set(choices)
        assert "snapkv" in choices["+policy=NAME"] and "passkey" in choices["task=NAME"]
        assert "tiny_random_llama" in choices["model=NAME"] and "qasper" in choices["task=longbench/NAME"]
        for internal in ("hydra/launcher", "hydra/help", "experiment/corm_longbench", "hydra/job_logging"):
            assert internal not in text
        assert "Powered by Hydra" not in text and "== Config ==" not in text
        assert "limit: null" in text and "KVBENCH_CONFIG_PATH" in text


def test_multirun_prints_one_table_of_all_its_points(tmp_path, data_dir):
    cmd = [sys.executable, "-m", "kvbench", "-m", f"data_dir={data_dir}", f"results_dir={tmp_path}"]
    cmd += ["model=tiny_random_llama", "limit=1", "progress=false", "task.max_new_tokens=2", "seed=0,1"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("| status ") for line in lines) == 1, done.stdout
    body = [line for line in lines if line.startswith("| ok ")]
    assert len(body) == 2 and lines[-1] == body[-1], done.stdout  # one table, at the very end
    assert {row["config_hash"] for row in ResultStore(tmp_path).rows()} and len(ResultStore(tmp_path).rows()) == 2
