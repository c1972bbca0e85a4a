"""Experiment loggers: ``logger=none`` (default) logs nothing; others mirror each results row."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from kvbench import schema
from kvbench.analysis.names import safe


class NoLogger:
    """Logs nothing anywhere."""

    def log_rows(self, cfg: Any, rows: list[dict[str, Any]]) -> None:
        """Receive the rows a run wrote."""

    def finish(self) -> None:
        """Close the logger at the end of a run."""


# Results-row key -> (W&B key, how the rows of a multi-task run combine in the run summary).
ROW_METRICS = schema.WANDB_METRICS
PREDICTION_COLUMNS = ["task", *schema.PREDICTION_TABLE]
MAX_PREDICTIONS = 50


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"name": "x"}}`` -> ``{"model/name": "x"}``; lists stay values."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    return out


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def row_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A results row's measurements under slash-named W&B keys (null ones left out)."""
    out = {f"score/{row['task']}": row["score"]}
    out.update({name: row[key] for key, (name, _) in ROW_METRICS.items() if _number(row.get(key))})
    for layer, kept in enumerate(row.get("kv_kept_per_layer") or []):
        out[f"kv_layer/kept_frac_{layer:02d}"] = kept
    return out


def run_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run summary: every task's score, their mean when there are several, the row metrics combined."""
    out: dict[str, Any] = {f"score/{row['task']}": row["score"] for row in rows}
    if len(rows) > 1:
        out["score/mean"] = sum(row["score"] for row in rows) / len(rows)
    for key, (name, how) in ROW_METRICS.items():
        values = [row[key] for row in rows if _number(row.get(key))]
        if values:
            out[name] = {"mean": sum(values) / len(values), "max": max(values), "sum": sum(values)}[how]
    return out


class WandbLogger:
    """Mirrors a run to Weights & Biases: the flattened Hydra config, per-task scores (``score/<task>``), the
    row's measurements (``kv/``, ``speed/``, ``memory/``), a sample of predictions and the model's figures.

    Offline unless ``WANDB_API_KEY`` is set (or ``mode`` / ``WANDB_MODE`` says otherwise), so no account is
    needed; run files go to ``<results_dir>/wandb`` and ``wandb sync`` uploads them later. The runs of one
    multirun share a group: ``group``, else the ``sweep_id`` (of the config, else of the rows, which a rerun may
    have written in an earlier sweep). ``wandb`` is imported only when rows arrive.
    """

    def __init__(
        self,
        project: str = "kvbench",
        entity: str | None = None,
        mode: str | None = None,
        group: str | None = None,
        tags: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.project, self.entity, self.mode, self.group = project, entity, mode, group
        self.tags = [str(tag) for tag in tags or ()]
        self.run: Any = None

    def resolved_mode(self) -> str:
        if self.mode:
            return str(self.mode)
        return os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")

    def resolved_group(self, cfg: Any, rows: list[dict[str, Any]]) -> str | None:
        """``group``, else this run's ``sweep_id`` (the config's, then the rows'): one group per multirun."""
        sweep_id = cfg.get("sweep_id") if hasattr(cfg, "get") else None
        return self.group or sweep_id or next((row["sweep_id"] for row in rows if row.get("sweep_id")), None)

    def log_rows(self, cfg: Any, rows: list[dict[str, Any]]) -> None:
        """Start one W&B run for the rows of this run (none when there are no rows) and log them."""
        if not rows:
            return
        import wandb
        from omegaconf import OmegaConf

        results_dir = Path(cfg.results_dir)
        (results_dir / "wandb").mkdir(parents=True, exist_ok=True)
        config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        first = rows[0]
        budget = first.get("budget") if first.get("budget") is not None else first.get("budget_tokens")
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.resolved_mode(),
            group=self.resolved_group(cfg, rows),
            tags=self.tags,
            job_type="eval",
            name=f"{first['model']}-{first['policy']}-{budget if budget is not None else 'nobudget'}",
            dir=str(results_dir),
            config=flatten(config),
            # The run is over when rows arrive: nothing left to capture from the console or the system.
            settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False),
        )
        for row in rows:
            self.run.log(row_metrics(row))
        self.run.summary.update(run_summary(rows))
        self.run.config.update({"config_hash": [row["config_hash"] for row in rows]}, allow_val_change=True)
        table = _predictions(results_dir, rows)
        if table:
            self.run.log({"predictions": wandb.Table(columns=PREDICTION_COLUMNS, data=table)})
        for path in _figures(results_dir, rows):
            self.run.log({f"figures/{path.stem}": wandb.Image(str(path))})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def _predictions(results_dir: Path, rows: list[dict[str, Any]]) -> list[list[Any]]:
    """At most 50 prediction records of the run's rows, sampled with a fixed seed, kept in file order."""
    from kvbench.store import ResultStore

    store = ResultStore(results_dir)
    records = [(row["task"], r) for row in rows for r in store.predictions(row["config_hash"]).values()]
    if len(records) > MAX_PREDICTIONS:
        records = [records[i] for i in sorted(random.Random(0).sample(range(len(records)), MAX_PREDICTIONS))]
    return [
        [task, r.get("id"), str(r.get("prediction")), " | ".join(map(str, r.get("answers") or []))]
        + [r.get("score"), r.get("n_prompt_tokens"), r.get("kv_kept_fraction")]
        for task, r in records
    ]


def _figures(results_dir: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """PNGs that ``python -m kvbench.plots`` drew for this run's model (``<figure>__<model>[__<setting>].png``)."""
    folder = results_dir / "figures"
    models = {safe(row["model"]) for row in rows}
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    return [path for path in pngs if len(path.stem.split("__")) > 1 and path.stem.split("__")[1] in models]
