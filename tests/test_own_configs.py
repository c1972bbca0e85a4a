"""A task and a policy of your own, from outside the repo (``hydra.searchpath`` / ``KVBENCH_CONFIG_PATH``);
``task=jsonl``; ``ids=[...]``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import open_dict

from kvbench.runner import config_hash, plan
from kvbench.store import ResultStore, read_lines
from kvbench.tasks.passkey import ANSWER_PREFIX, FILLER, INSTRUCTION, QUESTION

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random_llama", "progress=false"]

TASK_MODULE = '''
from dataclasses import dataclass

from kvbench.tasks.base import Example, Task


@dataclass
class EchoTask(Task):
    """Asks the model to repeat a word; scores whether the reply holds it."""

    name: str = "echo"
    word: str = "blue"

    def examples(self, data_dir, tokenizer):
        for index in range(3):
            question = f"Repeat the word {self.word}."
            yield Example(id=f"echo-{index}", prompt=question, answers=[self.word], question=question)

    def score(self, prediction, example):
        return float(example.answers[0] in prediction)
'''

POLICY_MODULE = '''
from dataclasses import dataclass

from kvbench.policies.base import ScorerPolicy


@dataclass
class NewestPolicy(ScorerPolicy):
    """Keep the most recent keys (score = position)."""

    def score(self, layer, ctx):
        return layer.positions.float()
'''


@pytest.fixture
def outside(tmp_path) -> tuple[Path, Path]:
    """(a module folder with a Task and a Policy subclass, a config folder with their YAMLs), outside the repo."""
    modules, configs = tmp_path / "modules", tmp_path / "configs"
    modules.mkdir()
    (modules / "my_tasks.py").write_text(TASK_MODULE)
    (modules / "my_policies.py").write_text(POLICY_MODULE)
    (configs / "task").mkdir(parents=True)
    (configs / "policy").mkdir()
    (configs / "task" / "echo.yaml").write_text("_target_: my_tasks.EchoTask\nname: echo\nmax_new_tokens: 4\n")
    (configs / "policy" / "newest.yaml").write_text("_target_: my_policies.NewestPolicy\n")
    return modules, configs


def kvbench(*args: str, env: dict[str, str] | None = None, **extra: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **(env or {}), **extra}
    cmd = [sys.executable, "-m", "kvbench", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)


def on_path(*folders: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([*map(str, folders), str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("how", ["hydra.searchpath", "KVBENCH_CONFIG_PATH"])
def test_task_and_policy_from_outside_the_repo(how, outside, tmp_path, monkeypatch):
    monkeypatch.delenv("KVBENCH_CONFIG_PATH", raising=False)
    modules, configs = outside
    results = tmp_path / "results"
    args = [*TINY, "task=echo", "+policy=newest", "budget=0.5", "limit=1", f"results_dir={results}"]
    env = on_path(modules)
    if how == "hydra.searchpath":
        args.append(f"hydra.searchpath=[file://{configs}]")
    else:
        env["KVBENCH_CONFIG_PATH"] = str(configs)
    done = kvbench(*args, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = ResultStore(results).rows()
    assert (row["task"], row["policy"], row["n_examples"], row["budget"]) == ("echo", "my_policies", 1, 0.5)
    assert 0 < row["kv_kept_fraction"] < 1


def test_own_options_are_validated_and_listed(outside, tmp_path, monkeypatch):
    monkeypatch.delenv("KVBENCH_CONFIG_PATH", raising=False)
    modules, configs = outside
    results = tmp_path / "results"
    env = {**on_path(modules), "KVBENCH_CONFIG_PATH": str(configs)}
    done = kvbench(*TINY, "+policy=nope", f"results_dir={results}", env=env)
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line.startswith("kvbench: error: unknown policy 'nope'; valid: ")
    assert "newest" in line and "snapkv" in line
    # Without the folder the task is unknown; the two ways add up (the command line's folder and the env's).
    done = kvbench(*TINY, "task=echo", f"results_dir={results}", env=on_path(modules))
    assert done.returncode == 2 and "unknown task 'echo'; valid: " in done.stderr
    other = tmp_path / "other"
    (other / "task").mkdir(parents=True)
    (other / "task" / "echo2.yaml").write_text("_target_: my_tasks.EchoTask\nname: echo2\nmax_new_tokens: 2\n")
    done = kvbench(*TINY, "task=echo2", "+policy=newest", "budget=0.5", "limit=1", f"results_dir={results}",
                   f"hydra.searchpath=[file://{other}]", env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["task"] for row in ResultStore(results).rows()] == ["echo2"]
    # A folder that does not exist, a class whose module is not importable: one line each, nothing written.
    done = kvbench(*TINY, "task=echo", f"results_dir={results}/x", env={**on_path(), "KVBENCH_CONFIG_PATH": "/no/dir"})
    assert done.returncode == 2 and done.stderr.strip() == (
        "kvbench: error: config search path file:///no/dir: folder /no/dir does not exist"
    )
    done = kvbench(
        *TINY, "task=echo", f"results_dir={results}/x", env={**on_path(), "KVBENCH_CONFIG_PATH": str(configs)}
    )
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("kvbench: error: task 'my_tasks.EchoTask' cannot be imported (") and "PYTHONPATH" in line
    assert not (results / "x").exists()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_jsonl_task_scores_with_its_metric(tmp_path):
    # SmolLM2-135M reads a passkey back (the passkey task's wording); the second reference is wrong: score 50.
    needle = "The passkey is 48213. Remember it. 48213 is the passkey. "
    context = INSTRUCTION + FILLER * 10 + needle + FILLER * 10
    records = [
        {"id": name, "context": context, "question": QUESTION, "answers": [answer], "answer_prefix": ANSWER_PREFIX}
        for name, answer in (("right", "48213"), ("wrong", "77777"))
    ]
    data = write_jsonl(tmp_path / "mine.jsonl", records)
    results = tmp_path / "results"
    args = ["task=jsonl", f"task.path={data}", "task.metric=string_match_part", "task.max_new_tokens=8"]
    done = kvbench(*args, "progress=false", f"results_dir={results}")
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = ResultStore(results).rows()
    predictions = {r["id"]: r for r in read_lines(ResultStore(results).predictions_path(row["config_hash"]))}
    assert "48213" in predictions["right"]["prediction"] and predictions["right"]["score"] == 1.0
    assert predictions["wrong"]["score"] == 0.0
    assert row["score"] == 50.0 and row["task"] == "jsonl" and row["data_revision"]


BAD_JSONL = [
    ('{"context": "c", "question": "q", "answers": ["a"]}\n{"context": "c", "question"\n', ":2 is not a JSON object"),
    ('{"context": "c", "question": "q", "answers": "a"}\n', ":1: 'answers' must be a non-empty list of strings"),
    ('{"context": "c", "answers": ["a"]}\n', ":1: 'question' must be a string"),
    ('{"id": 1, "context": "c", "question": "q", "answers": ["a"]}\n' * 2, ":2: id '1' appears twice"),
]


@pytest.mark.parametrize(("text", "message"), BAD_JSONL)
def test_bad_jsonl_and_metric_are_one_line_before_the_model(text, message, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    results = tmp_path / "results"
    done = kvbench(*TINY, "task=jsonl", f"task.path={data}", f"results_dir={results}")
    (line,) = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line.startswith("kvbench: error: task 'jsonl': ") and f"{data}{message}" in line
    good = write_jsonl(tmp_path / "good.jsonl", [{"context": "c", "question": "q", "answers": ["a"]}])
    done = kvbench(*TINY, "task=jsonl", f"task.path={good}", "task.metric=bleu", f"results_dir={results}")
    assert done.returncode == 2 and done.stderr.strip() == (
        "kvbench: error: unknown task.metric 'bleu'; valid: qa_f1, qa_f1_zh, rouge, rouge_zh, code_sim, count, "
        "string_match_all, string_match_part"
    )
    assert not results.exists()


@pytest.fixture
def three(tmp_path) -> Path:
    records = [{"id": name, "context": f"Context {name}.", "question": "Which?", "answers": [name]} for name in "abc"]
    return write_jsonl(tmp_path / "three.jsonl", records)


def test_ids_select_exactly_those_examples(three, tmp_path):
    results = tmp_path / "results"
    base = [*TINY, "task=jsonl", f"task.path={three}", "task.max_new_tokens=2", f"results_dir={results}"]
    done = kvbench(*base, "ids=[c,a]")
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = ResultStore(results).rows()
    path = ResultStore(results).predictions_path(row["config_hash"])
    assert [r["id"] for r in read_lines(path)] == ["a", "c"] and row["n_examples"] == 2  # the file's order
    assert row["ids"] == ["c", "a"]  # the row records what was asked for
    again = kvbench(*base, "ids=[a,c,a]")  # the same examples: the same row, skipped
    assert again.returncode == 0 and ResultStore(results).rows() == [row]
    done = kvbench(*base, "ids=[b,c]", "limit=1")  # ids first, then limit
    assert done.returncode == 0, done.stderr[-3000:]
    rows = ResultStore(results).rows()
    assert len(rows) == 2 and rows[1]["n_examples"] == 1
    assert [r["id"] for r in read_lines(ResultStore(results).predictions_path(rows[1]["config_hash"]))] == ["b"]
    done = kvbench(*base, "ids=[a,zz]")
    assert done.returncode == 2 and done.stderr.strip() == (
        "kvbench: error: task 'jsonl' has no example with id zz; valid ids: a, b, c"
    )


def test_ids_without_a_tokenizer_free_list_are_checked_before_predictions(tmp_path):
    # passkey's ids need the tokenizer: an unknown one is refused once the examples exist, before any prediction.
    results = tmp_path / "results"
    done = kvbench(
        *TINY, "task.lengths=[256]", "task.depths=[0.5]", "ids=[passkey-256-0.5-7]", f"results_dir={results}"
    )
    assert (
        done.returncode == 2 and "task 'passkey' has no example with id passkey-256-0.5-7; valid ids: " in done.stderr
    )
    assert "passkey-256-0.5-0" in done.stderr
    assert not (results / "results.jsonl").exists() and not list(results.glob("predictions/*.jsonl"))


def test_ids_hash_only_when_set(make_config, three):
    def key(*overrides: str, drop_ids: bool = False) -> str:
        run = plan(make_config("model=tiny_random_llama", "task=jsonl", f"task.path={three}", *overrides))
        if drop_ids:  # a configuration from before ``ids`` existed
            with open_dict(run.cfg):
                del run.cfg["ids"]
        return config_hash(run.cfg, run.tasks[0])

    plain = key()
    assert plain == key(drop_ids=True)  # unset ids leave every earlier row's hash as it was
    assert key("ids=[a,c]") == key("ids=[c,a,a]") != plain
    assert key("ids=[a]") != key("ids=[a,c]")
    three.write_text(three.read_text().replace("Context a.", "Context A."))  # an edited file is a new run
    assert key() != plain


def test_help_lists_own_folders(outside, monkeypatch):
    modules, configs = outside
    done = kvbench("--help", env={"KVBENCH_CONFIG_PATH": str(configs)})
    assert done.returncode == 0, done.stderr
    assert "echo" in done.stdout and "newest" in done.stdout
    done = kvbench("--help", f"hydra.searchpath=[file://{configs}]", env={"KVBENCH_CONFIG_PATH": ""})
    assert "newest" in done.stdout


def test_docs_describe_both_ways():
    tasks, policies = (REPO / "docs" / "tasks.md").read_text(), (REPO / "docs" / "policies.md").read_text()
    for text in (tasks, policies):
        assert "KVBENCH_CONFIG_PATH" in text and "hydra.searchpath" in text
    assert "task=jsonl" in tasks and "ids=" in tasks
    assert "class EchoTask(Task)" in tasks and "class NewestPolicy(ScorerPolicy)" in policies  # as tested here
