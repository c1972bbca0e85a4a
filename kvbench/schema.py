"""The results schema: one ``Row`` per run x task in ``results.jsonl``, one ``Prediction`` per example in
``predictions/<config_hash>.jsonl``, and their provenance (config hash, versions, git commit).

This is the one definition of the columns: the runner builds these dataclasses, the store writes them as dicts
(keys in field order), and the report, the loggers, the analysis and ``docs/results.md`` take their column
lists from here. Rows are read back as plain dicts, so rows written before a column existed still load.
``python -m kvbench.schema`` prints ``docs/results.md``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbench.version import __version__

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kvbench.tasks.base import Task

# Keys that do not change what a run computes; they stay out of the configuration hash.
UNHASHED = ("results_dir", "data_dir", "logger", "sweep_id", "batch_size", "progress", "attention", "compile")
_NONE = object()  # no default for rows that predate a column


def column(
    doc: str,
    *,
    failed: bool = False,
    ok: bool = True,
    legacy: Any = _NONE,
    wandb: tuple[str, str] | None = None,
    report: tuple[str, str] | None = None,
    table: bool = False,
) -> Any:
    """A documented column. ``failed``: a failed row carries it too; ``ok``: an ok row carries it; ``legacy``:
    the value the analysis assumes when an older row lacks it; ``wandb``: (W&B key, how a multi-task run's rows
    combine); ``report``: (header, format) in the end-of-run table; ``table``: in the W&B predictions table.
    Columns only some rows carry default to None."""
    metadata = {
        "doc": doc,
        "failed": failed,
        "ok": ok,
        "legacy": legacy,
        "wandb": wandb,
        "report": report,
        "table": table,
    }
    return field(default=None, metadata=metadata) if not (failed and ok) else field(metadata=metadata)


@dataclass(kw_only=True)
class Row:
    """One run x task: its configuration, score and measurements (a failed point: configuration and reason)."""

    config_hash: str = column(
        "Hash of what determines the numbers (the configuration without the unhashed keys, plus the task); "
        "the name of the predictions file",
        failed=True,
        legacy=None,
    )
    status: str = column("`ok`, or `failed`: the point raised while it ran (a rerun retries it)", failed=True)
    reason: str | None = column("Why a failed point failed: `Type: first line of the message`", failed=True, ok=False)
    model: str = column("Model name (`model.name`)", failed=True, legacy=None)
    policy: str = column("Policy name", failed=True, legacy="full")
    label: str | None = column(
        "The policy's display name, with its extension or approximation mark when it has one", legacy=None
    )
    policy_params: dict[str, Any] = column("The policy's parameters, in field order", failed=True, legacy=None)
    kv_masked: bool = column(
        "Whether the policy only masks entries (they stay in memory) instead of removing them", legacy=False
    )
    budget: float | None = column(
        "Kept fraction each (layer, KV head) may hold, in (0, 1]; null without a fractional budget",
        failed=True,
        legacy=None,
    )
    budget_tokens: int | None = column(
        "Entries each (layer, KV head) may hold; null without a token budget", failed=True, legacy=None
    )
    task: str = column("Task name (`family/subset` for LongBench and RULER)", failed=True, legacy=None)
    task_family: str = column("Task family: `longbench`, `synthetic`, `ruler`, ...", failed=True)
    task_version: str | None = column("Version of the task's prompts and scoring")
    data_revision: str | None = column("Revision of the task's data on the hub, when it came from there")
    protocol: str = column(
        "`official` (the policy sees the whole prompt) or `query_agnostic` (the question is appended after "
        "compression)",
        failed=True,
        legacy="official",
    )
    n_examples: int = column("Examples scored", legacy=0, wandb=("eval/n_examples", "sum"), report=("n", "{}"))
    truncated_share: float = column("Share of examples whose prompt was middle-truncated")
    score: float = column(
        "Task score: 100 x the mean per-example score (the task's own aggregate)",
        legacy=math.nan,
        report=("score", "{:.2f}"),
    )
    score_breakdown: dict[str, float] = column(
        "Scores of slices of the task (by length and depth, by whether the needle lay in a protected window)"
    )
    kv_kept_fraction: float = column(
        "Mean over examples of held entries / full-cache entries, over all steps",
        legacy=math.nan,
        wandb=("kv/kept_frac", "mean"),
        report=("kept", "{:.3f}"),
    )
    kv_kept_per_layer: list[float] = column("Kept fraction at the end per layer, mean over examples and KV heads")
    attention_mass_retained: float | None = column(
        "Mean share of the full-history attention on held keys (`diagnostics=true` only)",
        legacy=None,
        wandb=("kv/attention_mass", "mean"),
    )
    kv_bytes: int = column(
        "Peak bytes the cache held per example (keys, values, positions and policy state), max over examples",
        legacy=math.nan,
        wandb=("kv/bytes", "max"),
        report=("KV MiB peak", "{:.1f}"),
    )
    kv_payload_bytes: int = column(
        "Peak bytes of keys and values only, per example, max over examples",
        legacy=math.nan,
        wandb=("kv/payload_bytes", "max"),
    )
    kv_bytes_decode: int = column(
        "Peak bytes held during decode (the compressed cache while generating), per example",
        legacy=math.nan,
        report=("KV MiB decode", "{:.1f}"),
    )
    kv_bytes_full: int = column(
        "Bytes of keys and values a full cache would hold, per example", legacy=math.nan, wandb=("kv/bytes_full", "max")
    )
    peak_memory_bytes: int = column(
        "Peak device memory of prefill or decode (see `peak_memory_kind`), max over batches",
        legacy=math.nan,
        wandb=("memory/peak_bytes", "max"),
    )
    peak_memory_prefill_bytes: int = column(
        "Peak device memory during prefill, max over batches",
        legacy=math.nan,
        wandb=("memory/peak_prefill_bytes", "max"),
    )
    peak_memory_decode_bytes: int = column(
        "Peak device memory during decode, max over batches",
        legacy=math.nan,
        wandb=("memory/peak_decode_bytes", "max"),
    )
    peak_memory_kind: str = column(
        "What the peaks measure: `cuda_max_allocated`, `cpu_rss_high_water_per_phase` or `cpu_max_rss_lifetime`"
    )
    prefill_tokens_per_s: float | None = column(
        "Prompt tokens / prefill time, over all examples",
        legacy=None,
        wandb=("speed/prefill_tok_s", "mean"),
        report=("prefill tok/s", "{:.0f}"),
    )
    decode_tokens_per_s: float | None = column(
        "Tokens produced by decode steps (`n_decode_tokens`) / decode time, over all examples: the first "
        "generated token comes from prefill and is not counted (a record without `n_decode_tokens`, written "
        "before it existed, counts its generated tokens minus one)",
        legacy=None,
        wandb=("speed/decode_tok_s", "mean"),
        report=("decode tok/s", "{:.1f}"),
    )
    ttft_s: float = column(
        "Mean time to first token (the prefill time of the example's batch)",
        legacy=None,
        wandb=("speed/ttft_s", "mean"),
    )
    score_pass_s: float | None = column(
        "Mean seconds of the policy's scoring pass in the example's batch (KVzip's context reconstruction), "
        "part of `ttft_s`; null for a policy without one",
        legacy=None,
        wandb=("speed/score_pass_s", "mean"),
    )
    wall_s: float = column("Wall time of this task's examples in this process", wandb=("time/wall_s", "sum"))
    device: str = column("`cpu` or `cuda`")
    dtype: str = column("Model dtype: `float32`, `bfloat16` or `float16`")
    attention: str = column("Attention kernel: `sdpa` or `flash_attention_2` (not hashed)")
    compile: bool = column("Whether decode steps ran under `torch.compile` (not hashed: same tokens)", legacy=False)
    diagnostics: bool = column("Whether attention-mass diagnostics were on")
    batch_size: int = column("Examples per batch (not hashed: per-example numbers do not depend on it)")
    limit: int | None = column("Examples per task asked for; null for all")
    ids: list[str] | None = column(
        "The example ids asked for (`ids=[...]`), in the order given; null for all", legacy=None
    )
    seed: int = column("Random seed", failed=True, legacy=0)
    prefill_eviction: str = column(
        "`whole` (evict once after the prompt) or `chunked` (after every prefill chunk)", legacy="whole"
    )
    chunk_size: int = column("Prefill chunk length in tokens")
    max_prompt_tokens: int = column("The model's prompt limit (LongBench middle-truncates to it)")
    sweep_id: str | None = column("Id shared by the points of one sweep", failed=True, legacy=None)
    slurm_job_id: str | None = column("`SLURM_JOB_ID` of the job that wrote the row", failed=True)
    git_commit: str = column("HEAD of the kvbench checkout, `-dirty` with uncommitted changes", failed=True)
    versions: dict[str, str] = column("Versions of python, torch, transformers and kvbench")
    timestamp: str = column("When the row was written (UTC, ISO 8601)", failed=True, legacy="")

    def to_dict(self) -> dict[str, Any]:
        """The JSON line: an ok row's columns, or a failed row's, in field order."""
        names = FAILED_COLUMNS if self.status == "failed" else OK_COLUMNS
        return {name: getattr(self, name) for name in names}


@dataclass(kw_only=True)
class Prediction:
    """One example of a run: its prediction, score and per-example measurements."""

    id: str = column("Example id", table=True)
    prediction: str = column("The post-processed model output that was scored", table=True)
    answers: list[str] = column("Reference answers", table=True)
    score: float = column("Score in [0, 1]", table=True)
    meta: dict[str, Any] = column(
        "Task metadata (length, depth, ...); for a needle in the model input also `needle_span`, `needle_depth` "
        "(start / input tokens), `needle_in_window` and `needle_window_share` (share in a protected window)"
    )
    n_prompt_tokens: int = column("Tokens of the model input (template and held-out question included)", table=True)
    n_prompt_tokens_original: int = column("Tokens of the user message before middle truncation")
    n_prompt_tokens_kept: int = column("Tokens of the user message after middle truncation")
    n_new_tokens: int = column("Generated tokens, stop token excluded")
    n_decode_tokens: int = column(
        "Tokens produced by decode steps: the generated tokens after the first (which prefill produces), plus a "
        "stop token a decode step produced"
    )
    kv_kept_fraction: float = column("Held entries / full-cache entries, over all steps", table=True)
    kv_kept_per_head: list[list[float]] = column("Kept fraction at the end per layer and KV head")
    attention_mass_retained: float | None = column("Share of the full-history attention on held keys (diagnostics)")
    kv_bytes: int = column("Peak bytes the batch's cache held (all state) / batch size")
    kv_payload_bytes: int = column("Peak bytes of keys and values / batch size")
    kv_bytes_decode: int = column("Peak bytes held during decode / batch size")
    kv_bytes_full: int = column("Bytes of keys and values a full cache would hold / batch size")
    kv_bytes_batch: int = column("Peak bytes the batch's cache held (all state, padding included)")
    prefill_s: float = column("The batch's prefill time x this example's share of its prompt tokens")
    decode_s: float = column("The batch's decode time x this example's share of its prompt tokens")
    ttft_s: float = column("The batch's prefill time (time to first token)")
    score_pass_s: float | None = column("The batch's scoring-pass time, part of `ttft_s` (null: no such pass)")
    prefill_peak_bytes: int = column("Peak device memory during the batch's prefill")
    decode_peak_bytes: int = column("Peak device memory during the batch's decode")
    policy_diagnostics: dict[str, Any] | None = column("Policy-specific diagnostics (e.g. FastGen's choice per head)")
    batch_size: int = column("Examples in this example's batch")

    def to_dict(self) -> dict[str, Any]:
        """The JSON line, keys in field order."""
        return {name: getattr(self, name) for name in PREDICTION_COLUMNS}


OK_COLUMNS = tuple(f.name for f in fields(Row) if f.metadata["ok"])
FAILED_COLUMNS = tuple(f.name for f in fields(Row) if f.metadata["failed"])
PREDICTION_COLUMNS = tuple(f.name for f in fields(Prediction))
# Defaults for columns an older or partial row may lack, so the analysis can rely on them.
ROW_DEFAULTS = {f.name: f.metadata["legacy"] for f in fields(Row) if f.metadata["legacy"] is not _NONE}
# Row column -> (W&B key, how the rows of a multi-task run combine in the run summary).
WANDB_METRICS = {f.name: f.metadata["wandb"] for f in fields(Row) if f.metadata["wandb"]}
# The W&B predictions table: the row's task, then these prediction columns.
PREDICTION_TABLE = tuple(f.name for f in fields(Prediction) if f.metadata["table"])
# The end-of-run table, in print order: (header, column, format).
_REPORTED = ("status", "task", "policy", "budget", "n_examples", "score", "kv_kept_fraction", "kv_bytes")
_REPORTED += ("kv_bytes_decode", "prefill_tokens_per_s", "decode_tokens_per_s")
_REPORT_FORMATS = {f.name: f.metadata["report"] or (f.name, "{}") for f in fields(Row)}
REPORT_COLUMNS = tuple((_REPORT_FORMATS[name][0], name, _REPORT_FORMATS[name][1]) for name in _REPORTED)
# The efficiency table's measurements, in its column order.
EFFICIENCY = (
    "kv_kept_fraction",
    "kv_bytes",
    "kv_payload_bytes",
    "kv_bytes_decode",
    "kv_bytes_full",
    "peak_memory_bytes",
    "peak_memory_prefill_bytes",
    "peak_memory_decode_bytes",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "ttft_s",
    "attention_mass_retained",
)
# Columns the analysis reads as floats (null -> NaN).
NUMERIC = tuple(name for name in OK_COLUMNS if name in ("budget", "budget_tokens", "score", *EFFICIENCY))
if not set(EFFICIENCY) <= set(OK_COLUMNS):
    raise AssertionError(f"EFFICIENCY names columns Row lacks: {sorted(set(EFFICIENCY) - set(OK_COLUMNS))}")


def config_hash(cfg: DictConfig, task: Task) -> str:
    """Stable hash of what determines a row's numbers (model, policy, budget, task, protocol, ...)."""
    from omegaconf import OmegaConf

    content = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in UNHASHED}
    if content.get("ids") is None:  # all examples: the hash of a configuration from before ``ids`` existed
        content.pop("ids", None)
    else:  # the same examples, however listed
        content["ids"] = sorted({str(i) for i in content["ids"]})
    content["task"] = {"name": task.name, **{k: v for k, v in vars(task).items() if not k.startswith("_")}}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of python, torch, transformers and kvbench."""
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvbench": __version__,
    }


def git_commit() -> str:
    """HEAD of the kvbench checkout, with ``-dirty`` when tracked files have uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _table(cls: type, failed_column: bool) -> list[str]:
    header = "| column | type | failed rows | meaning |" if failed_column else "| column | type | meaning |"
    lines = [header, "|---|---|---|---|" if failed_column else "|---|---|---|"]
    for f in fields(cls):
        doc = f.metadata["doc"].replace("|", "\\|")
        kind = str(f.type).replace("|", "\\|")
        if failed_column:
            carried = "only" if not f.metadata["ok"] else "yes" if f.metadata["failed"] else ""
            lines.append(f"| `{f.name}` | `{kind}` | {carried} | {doc} |")
        else:
            lines.append(f"| `{f.name}` | `{kind}` | {doc} |")
    return lines


def markdown() -> str:
    """``docs/results.md``: the row and prediction schema, generated from the dataclasses above."""
    unhashed = ", ".join(f"`{key}`" for key in UNHASHED)
    lines = [
        "# Results schema",
        "",
        "<!-- Generated by `python -m kvbench.schema > docs/results.md` from kvbench/schema.py; do not edit. -->",
        "",
        "A results directory holds `results.jsonl` (one row per run x task, appended) and",
        "`predictions/<config_hash>.jsonl` (one record per example). Keys are written in the order below.",
        f"`config_hash` hashes the resolved configuration without {unhashed}, plus the task's fields.",
        "A rerun skips a finished row and resumes a half-done task from its predictions.",
        "",
        "## Row (`results.jsonl`)",
        "",
        "A failed point (`status: failed`) writes only the columns marked in *failed rows*; it has no numbers,",
        "and a rerun retries it. Rows written before a column existed lack it; the analysis fills a default.",
        "",
        *_table(Row, failed_column=True),
        "",
        "## Prediction (`predictions/<config_hash>.jsonl`)",
        "",
        *_table(Prediction, failed_column=False),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(markdown())
