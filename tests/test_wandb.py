"""``WandbLogger`` offline (no account, no network) and ``NoLogger`` (never imports wandb)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from matplotlib.figure import Figure
from omegaconf import OmegaConf

from kvbench.analysis.figures import save
from kvbench.config import CONFIG_DIR
from kvbench.loggers import MAX_PREDICTIONS, WandbLogger, flatten, row_metrics, run_summary
from kvbench.store import read_lines
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
