"""Experiment loggers: ``logger=none`` (default) logs nothing; others mirror each results row."""

from __future__ import annotations

import configparser
import netrc
import os
import random
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvbench import schema
from kvbench.analysis.names import safe

DEFAULT_HOST = "https://api.wandb.ai"


class NoLogger:
    """Logs nothing anywhere."""

    def start(self, cfg: Any) -> None:
        """Called once the run's configuration is valid, before the model loads and the first task."""

    def log_rows(self, cfg: Any, rows: list[dict[str, Any]]) -> None:
        """Receive rows as their tasks finish (a resumed run's finished rows first)."""

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


def wandb_host(environ: dict[str, str] | None = None) -> str:
    """The W&B server runs go to: ``WANDB_BASE_URL``, else the ``base_url`` that ``wandb login --host`` saved
    in wandb's settings file (``$WANDB_CONFIG_DIR/settings``, default ``~/.config/wandb/settings``), else
    wandb's own server."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_BASE_URL"):
        return environ["WANDB_BASE_URL"]
    folder = Path(environ.get("WANDB_CONFIG_DIR") or Path(environ.get("HOME", "~")) / ".config" / "wandb")
    settings = configparser.ConfigParser()
    try:
        settings.read(folder.expanduser() / "settings")
    except configparser.Error:
        return DEFAULT_HOST
    return settings.get("default", "base_url", fallback=DEFAULT_HOST) or DEFAULT_HOST


def netrc_path(environ: dict[str, str] | None = None) -> Path:
    """The netrc file ``wandb login`` writes its key to: ``NETRC``, else ``~/.netrc`` (``~/_netrc`` if only
    that exists), as wandb reads it."""
    environ = os.environ if environ is None else environ
    if environ.get("NETRC"):
        return Path(environ["NETRC"]).expanduser()
    home = Path(environ.get("HOME") or Path.home())
    unix, windows = home / ".netrc", home / "_netrc"
    return windows if not unix.exists() and windows.exists() else unix


def has_credentials(environ: dict[str, str] | None = None) -> bool:
    """Whether wandb would find credentials for its server, without any network: ``WANDB_API_KEY``,
    ``WANDB_IDENTITY_TOKEN_FILE``, or a password for the server's host in the netrc file (what ``wandb login``
    stores), the sources and order of wandb's own check."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY") or environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(wandb_host(environ)).netloc
    try:
        entry = netrc.netrc(str(netrc_path(environ))).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


class WandbLogger:
    """Mirrors a run to Weights & Biases as it goes: ``wandb.init`` once the configuration is valid (before
    the model loads; system stats and the console are recorded), each task's row as it finishes (its score as
    ``score/<task>``, its measurements as ``kv/``, ``speed/``, ``memory/``), and at the end a sample of
    predictions as a table, every prediction as a ``predictions`` artifact, and the model's figures.

    Online when wandb has credentials (``wandb login``'s netrc entry, ``WANDB_API_KEY``; see
    ``has_credentials``), else offline, so no account is needed; ``mode`` / ``WANDB_MODE`` decide otherwise.
    Run files go to ``<results_dir>/wandb``; ``wandb sync`` uploads an offline run, its artifact included,
    later. The runs of one multirun share a group: ``group``, else the config's ``sweep_id``. ``wandb`` is
    imported only when a run starts.
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
        self.rows: list[dict[str, Any]] = []
        self.results_dir = Path(".")

    def resolved_mode(self) -> str:
        if self.mode:
            return str(self.mode)
        return os.environ.get("WANDB_MODE") or ("online" if has_credentials() else "offline")

    def resolved_group(self, cfg: Any, rows: list[dict[str, Any]]) -> str | None:
        """``group``, else this run's ``sweep_id`` (the config's, then the rows'): one group per multirun."""
        sweep_id = cfg.get("sweep_id") if hasattr(cfg, "get") else None
        return self.group or sweep_id or next((row["sweep_id"] for row in rows if row.get("sweep_id")), None)

    def start(self, cfg: Any, rows: list[dict[str, Any]] | None = None) -> None:
        """Start the W&B run of this configuration (named model-policy-budget)."""
        import wandb
        from omegaconf import OmegaConf

        self.results_dir = Path(cfg.results_dir)
        (self.results_dir / "wandb").mkdir(parents=True, exist_ok=True)
        config = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        self.run = wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.resolved_mode(),
            group=self.resolved_group(cfg, rows or []),
            tags=self.tags,
            job_type="eval",
            name=run_name(config, rows or []),
            dir=str(self.results_dir),
            config=flatten(config),
            settings=wandb.Settings(save_code=False),
        )

    def log_rows(self, cfg: Any, rows: list[dict[str, Any]]) -> None:
        """Log each row (starting the run first if ``start`` was not called and there are rows)."""
        if not rows:
            return
        if self.run is None:
            self.start(cfg, rows)
        for row in rows:
            self.run.log(row_metrics(row))
        self.rows += rows
        self.run.summary.update(run_summary(self.rows))
        self.run.config.update({"config_hash": [row["config_hash"] for row in self.rows]}, allow_val_change=True)

    def finish(self) -> None:
        """Log the predictions (a sample as a table, all as an artifact) and the figures, and end the run."""
        if self.run is None:
            return
        import wandb

        table = _predictions(self.results_dir, self.rows)
        if table:
            self.run.log({"predictions": wandb.Table(columns=PREDICTION_COLUMNS, data=table)})
        artifact = predictions_artifact(self.results_dir, self.rows, self.run.id)
        if artifact is not None:
            self.run.log_artifact(artifact)
        for path in _figures(self.results_dir, self.rows):
            self.run.log({f"figures/{path.stem}": wandb.Image(str(path))})
        self.run.finish()
        self.run, self.rows = None, []


def run_name(config: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """``<model>-<policy>-<budget>``, from the first row when there is one, else from the configuration."""
    if rows:
        first = rows[0]
        model, policy = first["model"], first["policy"]
        budget = first.get("budget") if first.get("budget") is not None else first.get("budget_tokens")
    else:
        model = (config.get("model") or {}).get("name")
        target = (config.get("policy") or {}).get("_target_")
        policy = target.rsplit(".", 2)[-2] if target else "full"  # a policy's name is its module's
        budget = config.get("budget") if config.get("budget") is not None else config.get("budget_tokens")
    return f"{model}-{policy}-{budget if budget is not None else 'nobudget'}"


def predictions_artifact(results_dir: Path, rows: list[dict[str, Any]], run_id: str) -> Any:
    """A ``predictions`` artifact holding every prediction file of the rows (``<config hash>.jsonl``, the task
    of each in its metadata); None when there are none."""
    import wandb

    from kvbench.store import ResultStore

    store = ResultStore(results_dir)
    files = {row["config_hash"]: (row["task"], store.predictions_path(row["config_hash"])) for row in rows}
    files = {key: (task, path) for key, (task, path) in files.items() if path.is_file()}
    if not files:
        return None
    artifact = wandb.Artifact(
        f"predictions-{run_id}", type="predictions", metadata={key: task for key, (task, _) in files.items()}
    )
    for key, (_, path) in files.items():
        artifact.add_file(str(path), name=f"{key}.jsonl")
    return artifact


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
