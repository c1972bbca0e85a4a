"""The library API on a model the test loaded itself: ``kvbench.evaluate`` gives the CLI's score, kept fraction and
predictions on the same config; ``kvbench.generate`` decodes under a policy and reports what the cache kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvbench
from kvbench.errors import UserError
from kvbench.models import load, model_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load(model_spec("tiny_random_llama"), "cpu", torch.float32)


def test_evaluate_equals_the_cli(model_and_tokenizer, data_dir, tmp_path):
    model, tokenizer = model_and_tokenizer
    args = {"limit": 2, "data_dir": str(data_dir)}
    (row,) = kvbench.evaluate(
        model, tokenizer, "snapkv", 0.3, "longbench/multi_news", str(tmp_path / "api"), "tiny_random_llama", **args
    )
    cmd = [sys.executable, "-m", "kvbench", "+policy=snapkv", "budget=0.3", "task=longbench/multi_news"]
    cmd += ["model=tiny_random_llama", *(f"{key}={value}" for key, value in args.items()), f"results_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (cli,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    for key in ("score", "kv_kept_fraction", "kv_bytes", "n_examples", "policy", "budget", "task", "model"):
        assert row[key] == cli[key], key
    assert predictions(tmp_path / "api") == predictions(tmp_path) and len(predictions(tmp_path)) == 2


def predictions(root: Path) -> list[str]:
    (path,) = (root / "predictions").glob("*.jsonl")
    return [json.loads(line)["prediction"] for line in path.read_text().splitlines()]


def test_evaluate_without_results_dir_writes_nothing(model_and_tokenizer, data_dir, tmp_path, monkeypatch):
    model, tokenizer = model_and_tokenizer
    monkeypatch.chdir(tmp_path)
    args = {"limit": 1, "data_dir": str(data_dir), "task.max_new_tokens": 8}
    api_dir = tmp_path / "api"
    (row,) = kvbench.evaluate(model, tokenizer, task="passkey", results_dir=str(api_dir), **args)
    (nothing,) = kvbench.evaluate(model, tokenizer, task="passkey", **args)
    assert nothing["score"] == row["score"] and nothing["model"] == "hf"
    assert list(tmp_path.iterdir()) == [api_dir]


def test_generate_keeps_the_budget_and_full_cache_keeps_all(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = ["The quick brown fox " * 40, "Once upon a time " * 60]
    compressed = kvbench.generate(model, tokenizer, prompts, policy="snapkv", budget=0.3, max_new_tokens=4)
    full = kvbench.generate(model, tokenizer, prompts, policy=None, budget=None, max_new_tokens=4)
    assert [len(result) for result in (compressed, full)] == [2, 2]
    assert all(r["kv_kept_fraction"] == 1.0 for r in full)
    assert all(0.2 < r["kv_kept_fraction"] < 0.45 for r in compressed)
    assert compressed[0]["kv_bytes"] < full[0]["kv_bytes"]
    assert all(isinstance(r["text"], str) for r in compressed + full)


def test_unknown_policy_is_one_line(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(UserError, match="unknown policy 'nope'; valid: "):
        kvbench.generate(model, tokenizer, ["hi"], policy="nope")
