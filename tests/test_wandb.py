"""``WandbLogger`` offline (no account, no network) and ``NoLogger`` (never imports wandb)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from kvbench.analysis.figures import save
from kvbench.config import CONFIG_DIR
from kvbench.loggers import MAX_PREDICTIONS, WandbLogger, flatten, has_credentials, row_metrics, run_summary
from kvbench.runner import run
from kvbench.store import ResultStore, read_lines
from tests.results_fixture import MODEL, TASKS, write_results

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline and silent, its caches in ``tmp_path``, and any server address unroutable."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything to be sent, it goes nowhere
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))


def _records(run_dir: Path) -> list[dict]:
    """The run's ``.wandb`` transaction log, one dict per record, read offline by ``wandb leet inspect``."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    done = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _summary(run_dir: Path, records: list[dict]) -> dict:
    """The run's summary: ``files/wandb-summary.json`` when wandb wrote one, else the log's summary updates."""
    summary_file = run_dir / "files" / "wandb-summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    summary: dict = {}
    for record in records:
        for key, value in record.get("summary", {}).get("update", {}).items() if record["type"] == "summary" else ():
            head, _, field = key.partition(".")  # a nested value (a table, an image) comes as "key.field"
            if field:
                summary.setdefault(head, {})[field] = value
            else:
                summary[key] = value
    return summary


def test_offline_run_holds_scores_config_and_predictions(offline, tmp_path):
    root = write_results(tmp_path / "results", n_examples=15)  # 4 tasks x 15 = 60 predictions, more than 50
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    save({f"score_vs_budget__{MODEL}": figure, "score_vs_budget__other_model": figure}, root / "figures", ("png",))
    rows = [row for row in read_lines(root / "results.jsonl") if row["policy"] == "snapkv" and row["budget"] == 0.3]
    assert [row["task"] for row in rows] == list(TASKS)
    cfg = OmegaConf.create({"results_dir": str(root), "model": {"name": MODEL}, "budget": 0.3, "sweep_id": "s1"})
    logger = instantiate(OmegaConf.load(CONFIG_DIR / "logger" / "wandb.yaml"))
    assert isinstance(logger, WandbLogger) and logger.resolved_mode() == "offline"
    logger.log_rows(cfg, rows)
    logger.finish()

    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb"))
    records = _records(runs[0])
    summary = _summary(runs[0], records)
    for row in rows:
        assert summary[f"score/{row['task']}"] == pytest.approx(row["score"])
    assert summary["score/mean"] == pytest.approx(sum(row["score"] for row in rows) / len(rows))
    assert summary["kv/kept_frac"] == pytest.approx(sum(row["kv_kept_fraction"] for row in rows) / len(rows))
    for key in ("kv/bytes", "memory/peak_bytes", "speed/decode_tok_s", "speed/prefill_tok_s", "speed/ttft_s"):
        assert key in summary
    assert summary["predictions"]["nrows"] == MAX_PREDICTIONS
    assert f"figures/score_vs_budget__{MODEL}" in summary
    assert "figures/score_vs_budget__other_model" not in summary

    run = next(record["run"] for record in records if record["type"] == "run")
    assert run["run_group"] == "s1"
    config = run["config"]["update"]
    assert config["model/name"] == MODEL and config["budget"] == 0.3 and config["results_dir"] == str(root)


def test_group_defaults_to_sweep_id_and_mode_to_offline(monkeypatch):
    rows = [{"sweep_id": None}, {"sweep_id": "from-row"}]
    assert WandbLogger().resolved_group(OmegaConf.create({"sweep_id": "from-cfg"}), rows) == "from-cfg"
    assert WandbLogger().resolved_group(OmegaConf.create({"sweep_id": None}), rows) == "from-row"
    assert WandbLogger(group="mine").resolved_group(OmegaConf.create({"sweep_id": "from-cfg"}), rows) == "mine"
    assert WandbLogger().resolved_group(OmegaConf.create({}), [{"sweep_id": None}]) is None
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert WandbLogger().resolved_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbLogger().resolved_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbLogger().resolved_mode() == "disabled"
    assert WandbLogger(mode="offline").resolved_mode() == "offline"


def test_no_rows_start_no_run(offline, tmp_path):
    logger = WandbLogger()
    logger.log_rows(OmegaConf.create({"results_dir": str(tmp_path)}), [])
    logger.finish()
    assert not (tmp_path / "wandb").exists()


def test_metric_names():
    assert flatten({"model": {"name": "m", "config": {"heads": 2}}, "tags": [1], "budget": None}) == {
        "model/name": "m",
        "model/config/heads": 2,
        "tags": [1],
        "budget": None,
    }
    row = {"task": "t", "score": 50.0, "kv_kept_fraction": 0.3, "kv_bytes": 10, "decode_tokens_per_s": 5.0}
    row.update(attention_mass_retained=None, kv_masked=True, kv_kept_per_layer=[0.25, 0.5])
    assert row_metrics(row) == {
        "score/t": 50.0,
        "kv/kept_frac": 0.3,
        "kv/bytes": 10,
        "speed/decode_tok_s": 5.0,
        "kv_layer/kept_frac_00": 0.25,
        "kv_layer/kept_frac_01": 0.5,
    }
    other = {**row, "task": "u", "score": 70.0, "kv_bytes": 30}
    assert run_summary([row, other])["score/mean"] == 60.0
    assert run_summary([row, other])["kv/bytes"] == 30


def test_no_logger_never_imports_wandb():
    code = (
        "import sys\n"
        "from hydra.utils import instantiate\n"
        "from omegaconf import OmegaConf\n"
        "import kvbench.loggers, kvbench.results, kvbench.store\n"
        "logger = instantiate(OmegaConf.load('kvbench/configs/logger/none.yaml'))\n"
        "logger.log_rows(OmegaConf.create({'results_dir': 'nowhere'}), [{'task': 't', 'score': 1.0}])\n"
        "logger.finish()\n"
        "print('wandb' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert not (REPO / "nowhere").exists()


CREDENTIAL_ENV = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "WANDB_CONFIG_DIR",
    "NETRC",
    "WANDB_IDENTITY_TOKEN_FILE",
)


def test_stored_credentials_count_as_online(monkeypatch, tmp_path):
    """What ``wandb login`` stores (a netrc entry for the server's host) means online; no network is used."""
    for name in CREDENTIAL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert not has_credentials() and WandbLogger().resolved_mode() == "offline"
    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'0123456789abcdef' * 2}01234567\n")
    netrc.chmod(0o600)
    assert has_credentials() and WandbLogger().resolved_mode() == "online"
    try:  # wandb's own reader agrees (an internal module: checked where this wandb has it)
        from wandb.sdk.lib.wbauth import read_netrc_auth
    except ImportError:
        read_netrc_auth = None
    if read_netrc_auth is not None:
        assert read_netrc_auth(host="https://api.wandb.ai")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # a key for another server does not count
    assert not has_credentials() and WandbLogger().resolved_mode() == "offline"
    monkeypatch.delenv("WANDB_BASE_URL")
    settings = tmp_path / ".config" / "wandb" / "settings"  # `wandb login --host` saves the server here
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.example.com\n")
    assert not has_credentials()
    with netrc.open("a") as file:
        file.write(f"machine wandb.example.com\n  login user\n  password {'f' * 40}\n")
    assert has_credentials() and WandbLogger().resolved_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert WandbLogger().resolved_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    moved = tmp_path / "elsewhere.netrc"
    netrc.rename(moved)
    assert not has_credentials()
    monkeypatch.setenv("NETRC", str(moved))
    assert has_credentials()


def test_cli_run_starts_first_logs_stats_rows_and_the_predictions_artifact(tmp_path):
    record = {"context": "Paris is in France.", "question": "Where?", "answers": ["France"]}
    records = [{"id": f"q{i}", **record} for i in range(3)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    results = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    env.update(HOME=str(tmp_path), WANDB_SILENT="true", WANDB_BASE_URL="http://127.0.0.1:9")  # no credentials
    for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[name] = str(tmp_path / "wandb-home" / name.lower())
    cmd = [sys.executable, "-m", "kvbench", "model=tiny_random_llama", "task=jsonl", f"task.path={data}"]
    cmd += ["task.max_new_tokens=2", "logger=wandb", "progress=false", f"results_dir={results}"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = ResultStore(results).rows()
    (run_dir,) = (results / "wandb").glob("offline-run-*")  # offline: no credentials, no WANDB_MODE
    log = _records(run_dir)
    kinds = [record["type"] for record in log]
    assert kinds.index("run") < kinds.index("history")
    assert "stats" in kinds  # system stats on
    lines = [r["output_raw"].get("line", "") for r in log if r["type"] == "output_raw"]
    assert lines, "the console is recorded"
    (history,) = [r["history"]["item"] for r in log if r["type"] == "history" and "score/jsonl" in r["history"]["item"]]
    assert history["score/jsonl"] == pytest.approx(row["score"])
    artifacts = [r["artifact"] for r in log if r["type"] == "artifact" and r["artifact"].get("type") == "predictions"]
    (artifact,) = artifacts
    paths = [entry["path"] for entry in artifact["manifest"]["contents"]]
    assert paths == [f"{row['config_hash']}.jsonl"]


class Recorder:
    """A logger that notes what was on disk each time the runner called it."""

    def __init__(self, results: Path) -> None:
        self.store, self.calls = ResultStore(results), []

    def start(self, cfg) -> None:
        self.calls.append(("start", len(self.store.rows()), self.store.root.exists()))

    def log_rows(self, cfg, rows) -> None:
        self.calls.append(("rows", len(self.store.rows()), [row["task"] for row in rows]))


def test_logger_starts_before_the_model_and_gets_each_row_as_its_task_ends(make_config, tmp_path):
    cfg = make_config(
        "model=tiny_random_llama", "task=longbench", "task.subsets=[multifieldqa_zh,passage_retrieval_zh]", "limit=1"
    )
    recorder = Recorder(Path(cfg.results_dir))
    rows = run(cfg, logger=recorder)
    assert [row["task"] for row in rows] == ["longbench/multifieldqa_zh", "longbench/passage_retrieval_zh"]
    assert recorder.calls == [
        ("start", 0, False),  # nothing written yet
        ("rows", 0, []),  # no finished rows to resume from
        ("rows", 1, ["longbench/multifieldqa_zh"]),  # as soon as the first task is done
        ("rows", 2, ["longbench/passage_retrieval_zh"]),
    ]
