"""One run: a model x policy x budget x task(s) configuration, evaluated example by example.

Everything the user can get wrong is checked before anything is written. Each task gets one row in
``results.jsonl``, keyed by a hash of the configuration; predictions are flushed one example at a time, so a
rerun of the same configuration skips finished rows and resumes a half-done task where it stopped.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from kvbench import models, policies
from kvbench.batching import collate, encode, length_grouped, needle_span
from kvbench.calibration import prepare
from kvbench.config import check_fields, check_settings
from kvbench.engine.engine import Engine, make_engine
from kvbench.engine.generate import Batch, generate
from kvbench.engine.kernels import KERNELS
from kvbench.errors import UserError, instantiate
from kvbench.measure import peak_kind
from kvbench.policies.base import Budget, Policy
from kvbench.schema import Prediction, Row, config_hash, git_commit, versions
from kvbench.store import ResultStore
from kvbench.tasks.base import Example, Task, check_ids, select

FAULT_ENV = "KVBENCH_TEST_FAULT_SEED"  # test only: see Runner._fault_hook


@dataclass
class Plan:
    """A validated run: what to build, before any model is loaded or file written."""

    cfg: DictConfig
    spec: models.ModelSpec
    policy: Policy
    budget: Budget
    tasks: list[Task]
    data_dir: Path
    store: ResultStore
    context: int | None = None  # the model's max_position_embeddings, when known before loading


def plan(cfg: DictConfig, check_model: bool = True) -> Plan:
    """Validate the configuration (raises a one-line ``UserError``) and instantiate policy and tasks;
    ``check_model=False`` skips the model's files (the library API passes a loaded model)."""
    check_settings(cfg)
    check_fields(models.ModelSpec, OmegaConf.to_container(cfg.model, resolve=True), prefix="model.")
    budget = Budget.from_config(cfg.budget, cfg.get("budget_tokens"))
    policy = policies.build(cfg.get("policy"))
    policy.check_budget(budget)
    check_kernel(cfg.attention, cfg.device, cfg.dtype)
    spec = models.ModelSpec(**OmegaConf.to_container(cfg.model, resolve=True))
    config = models.check_available(spec) if check_model else None
    context = (config or {}).get("max_position_embeddings")
    data_dir = Path(cfg.data_dir).expanduser()
    tasks = instantiate(cfg.task).subtasks()
    for task in tasks:
        task.check_data(data_dir)
        known = task.example_ids(data_dir) if cfg.get("ids") is not None else None
        if known is not None:  # else checked once the examples are built (they need the tokenizer)
            check_ids(task.name, cfg.ids, known)
        longest = max(getattr(task, "lengths", None) or [0])
        limit = prompt_limit(spec, task, context)
        if not truncates(task) and limit is not None and longest > limit:
            raise UserError(
                f"task '{task.name}' would be truncated: length {longest} is over model '{spec.name}''s "
                f"max_prompt_tokens={limit} ({spec.max_prompt_tokens_source or 'its limit'}); "
                "its score depends on the whole prompt, so use shorter task.lengths"
            )
    return Plan(cfg, spec, policy, budget, tasks, data_dir, ResultStore(cfg.results_dir), context)


def prompt_limit(spec: models.ModelSpec, task: Task, context: int | None) -> int | None:
    """The prompt tokens a task may use: ``max_prompt_tokens``, or when that is null the model's context minus the
    task's generation length (None while the context is not known)."""
    if spec.max_prompt_tokens is not None:
        return spec.max_prompt_tokens
    return None if context is None else context - task.max_new_tokens


def truncates(task: Task) -> bool:
    """LongBench middle-truncates long prompts (its protocol); every other task refuses to: passkey, needle
    and RULER are scored on the whole prompt."""
    return task.family == "longbench"


def check_kernel(kernel: str, device: str, dtype: str) -> None:
    """``attention=flash_attention_2`` needs flash-attn installed, a CUDA device and a half-precision dtype."""
    if kernel not in KERNELS:
        raise UserError(f"unknown attention '{kernel}'; valid: {', '.join(KERNELS)}")
    if kernel != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("attention=flash_attention_2 needs the flash-attn package (pip install flash-attn)")
    resolved = resolve_device(device)
    if resolved.type != "cuda" or resolve_dtype(dtype, resolved) not in (torch.bfloat16, torch.float16):
        raise UserError("attention=flash_attention_2 runs on CUDA in bfloat16/float16; use attention=sdpa here")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; valid: auto, cpu, cuda")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}'; valid: auto, cpu, cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in choices:
        raise UserError(f"unknown dtype '{name}'; valid: auto, {', '.join(choices)}")
    return choices[name]


_LOADED: dict[str, tuple[torch.nn.Module, Any]] = {}


def loaded_model(spec: models.ModelSpec, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, Any]:
    """The model of ``spec``, loaded once per process: the points of a sweep that share a model (a local
    multirun, or several points packed into one Slurm job) swap policies without reloading weights."""
    key = json.dumps([vars(spec), str(device), str(dtype)], sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = models.load(spec, device, dtype)
    return _LOADED[key]


class Runner:
    """Evaluates the tasks of one validated configuration with a (shared) loaded model."""

    def __init__(self, run: Plan, loaded: tuple[torch.nn.Module, Any] | None = None) -> None:
        self.plan = run
        cfg = run.cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = loaded or loaded_model(run.spec, self.device, self.dtype)
        self.context = getattr(self.model.config, "max_position_embeddings", None) or run.context
        self.stop_ids = _eos_ids(self.model, self.tokenizer)
        run.policy.bind(self.tokenizer)
        prepare(run.policy, self.model, self.tokenizer, run.data_dir)  # e.g. DuoAttention's head patterns
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny generation so one-time costs (allocations, kernel selection) stay out of the timings."""
        ids = self.tokenizer.encode("Warm up.", add_special_tokens=False)
        batch = collate([[ids, []]], self.tokenizer.pad_token_id, self.device)
        generate(
            self.model,
            self.engine(policies.build(None), Budget()),
            batch,
            2,
            set(),
            chunk_size=self.plan.cfg.chunk_size,
        )

    def engine(self, policy: Policy, budget: Budget) -> Engine:
        cfg = self.plan.cfg
        return make_engine(
            self.model, policy, budget, diagnostics=bool(cfg.diagnostics), kernel=cfg.attention, compile=cfg.compile
        )

    def run_task(self, task: Task) -> dict[str, Any] | None:
        """Evaluate one task, resuming from predictions on disk; returns its row (None if already done)."""
        cfg, store = self.plan.cfg, self.plan.store
        key = config_hash(cfg, task)
        with store.claim(key) as claimed:
            if not claimed:
                print(f"[kvbench] {task.name}: row {key} is being computed by another process, skipped")
                return None
            if store.has_row(key):  # finished by another process while this one waited to start
                print(f"[kvbench] {task.name}: row {key} already in {store.rows_path}, skipped")
                return None
            return self._run_claimed(task, key)

    def _run_claimed(self, task: Task, key: str) -> dict[str, Any]:
        store = self.plan.store
        hook = self._fault_hook()
        try:
            return self._evaluate(task, key)
        except UserError:
            raise
        except Exception as error:  # out of memory, a CUDA or data error: this point fails alone
            reason = one_line(error)
        finally:
            if hook is not None:
                hook.remove()
        # Out of the except block: the exception and its traceback (whose frames hold activations) are gone.
        free_memory(self.device)
        print(f"[kvbench] {task.name}: failed: {reason}", file=sys.stderr)
        row = self._failed_row(task, key, reason)
        store.add_failure(row)
        return row.to_dict()

    def _fault_hook(self) -> Any:
        """Test only: with ``KVBENCH_TEST_FAULT_SEED=<seed>``, the point of that seed raises ``MemoryError``
        inside the model's forward (in its last decoder layer), as an out-of-memory point would."""
        seed = os.environ.get(FAULT_ENV)
        if seed is None or int(seed) != int(self.plan.cfg.seed):
            return None

        def fail(module: torch.nn.Module, args: Any) -> None:
            raise MemoryError(f"simulated out of memory ({FAULT_ENV}={seed})")

        return self.model.model.layers[-1].register_forward_pre_hook(fail)

    def _check_context(self, task: Task, examples: list[Example]) -> None:
        """Refuse (one line, before any prediction) a prompt the model cannot take: over its context
        (``max_position_embeddings``), over ``max_prompt_tokens`` for a task that must not be truncated, or
        without a question to hold out under ``protocol=query_agnostic``."""
        spec, context, limit = self.plan.spec, self.context, self.prompt_limit(task)
        if context is not None and limit > context:
            raise UserError(
                f"model '{spec.name}': max_prompt_tokens={limit} is over its context of {context} "
                "tokens (max_position_embeddings)"
            )
        if self.plan.cfg.protocol == "query_agnostic":  # every question must split off (else an error, now)
            for example in examples:
                encode(
                    example, self.tokenizer, task.chat and spec.chat_template, limit, "query_agnostic", spec.chat_format
                )
        if truncates(task):
            return
        for example in examples:
            n = len(self.tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
            if n > limit:
                raise UserError(
                    f"task '{task.name}', example {example.id}: {n} prompt tokens, over model '{spec.name}''s "
                    f"max_prompt_tokens={limit}; this task is not truncated, use shorter lengths"
                )

    def prompt_limit(self, task: Task) -> int:
        """``max_prompt_tokens`` for ``task`` (see ``prompt_limit``); the loaded model's context when derived."""
        limit = prompt_limit(self.plan.spec, task, self.context)
        if limit is None:
            raise UserError(
                f"model '{self.plan.spec.name}' has no max_position_embeddings: set model.max_prompt_tokens"
            )
        return limit

    def _evaluate(self, task: Task, key: str) -> dict[str, Any]:
        cfg, store = self.plan.cfg, self.plan.store
        repair = store.damaged(key)
        examples = select(task.name, list(task.examples(self.plan.data_dir, self.tokenizer)), cfg.get("ids"), cfg.limit)
        self._check_context(task, examples)
        done = store.predictions(key)
        todo = [example for example in examples if example.id not in done]
        if done:
            print(f"[kvbench] {task.name}: resuming, {len(done)} of {len(examples)} examples already on disk")
        started = time.perf_counter()
        size = int(cfg.batch_size)
        with tqdm(total=len(todo), desc=task.name, unit="ex", disable=not cfg.progress or not todo) as bar:
            for batch in length_grouped(todo, size) if size > 1 else [[example] for example in todo]:
                for record in self._run_batch(task, batch):
                    store.add_prediction(key, record)
                bar.update(len(batch))
        records = [store.predictions(key)[example.id] for example in examples]
        row = self._row(task, key, records, time.perf_counter() - started)
        store.add_row(row, repair=repair)
        return row.to_dict()

    def _run_batch(self, task: Task, examples: list[Example]) -> list[Prediction]:
        cfg, spec = self.plan.cfg, self.plan.spec
        chat = task.chat and spec.chat_template
        limit = self.prompt_limit(task)
        encoded = [encode(ex, self.tokenizer, chat, limit, cfg.protocol, spec.chat_format) for ex in examples]
        batch: Batch = collate(encoded, self.tokenizer.pad_token_id, self.device)
        engine = self.engine(self.plan.policy, self.plan.budget)

        def stopped(row: int, tokens: list[int]) -> bool:
            return bool(task.stop) and task.stopped(self.tokenizer.decode(tokens))

        out = generate(
            self.model,
            engine,
            batch,
            task.max_new_tokens,
            self.stop_ids,
            chunk_size=int(cfg.chunk_size),
            evict_per_chunk=cfg.prefill_eviction == "chunked",
            stopped=stopped,
        )
        meters = engine.meters
        kept = meters.kept_fraction()
        per_layer = meters.final_kept_per_head(engine.cache, engine.seen())  # [L, B, Hkv]
        mass = meters.attention_mass()
        full_nbytes = meters.full_nbytes(engine.cache, int(engine.seen().max()))
        policy_diagnostics = self.plan.policy.diagnostics(engine.cache)
        prompt_tokens = batch.attention_mask.sum(-1).tolist()
        width = len(examples)
        records = []
        for row, example in enumerate(examples):
            original = len(self.tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
            raw = self.tokenizer.decode(out.tokens[row], skip_special_tokens=True)
            prediction = task.postprocess(raw)
            share = prompt_tokens[row] / sum(prompt_tokens)
            records.append(
                Prediction(
                    id=example.id,
                    prediction=prediction,
                    answers=example.answers,
                    score=task.score(prediction, example),
                    meta=self._meta(example, encoded[row], chat, limit),
                    n_prompt_tokens=prompt_tokens[row],
                    n_prompt_tokens_original=original,  # the user message, before middle truncation
                    n_prompt_tokens_kept=min(original, 2 * int(limit / 2)) if original > limit else original,
                    n_new_tokens=len(out.tokens[row]),
                    n_decode_tokens=out.n_decode_tokens[row],
                    kv_kept_fraction=float(kept[row]),
                    kv_kept_per_head=per_layer[:, row].tolist(),
                    attention_mass_retained=None if mass is None else float(mass[row]),
                    # Per example (the engine counts the whole batch, padding included): batch_size stays
                    # out of the config hash, so these must not depend on it.
                    kv_bytes=meters.peak_nbytes // width,
                    kv_payload_bytes=meters.peak_kv_nbytes // width,
                    kv_bytes_decode=meters.peak_decode_nbytes // width,
                    kv_bytes_full=full_nbytes // width,
                    kv_bytes_batch=meters.peak_nbytes,
                    prefill_s=out.prefill_s * share,
                    decode_s=out.decode_s * share,
                    ttft_s=out.prefill_s,
                    score_pass_s=out.score_pass_s,
                    prefill_peak_bytes=out.prefill_peak_bytes,
                    decode_peak_bytes=out.decode_peak_bytes,
                    policy_diagnostics=policy_diagnostics[row] if policy_diagnostics else None,
                    batch_size=len(examples),
                )
            )
        return records

    def _meta(self, example: Example, parts: list[list[int]], chat: bool, limit: int) -> dict[str, Any]:
        """The example's meta, plus for a needle task where the needle sits in the model input: its token span,
        its measured depth (start / input tokens) and how much of it lies in a window the policy keeps by rule."""
        meta = dict(example.meta)
        fmt = self.plan.spec.chat_format
        span = needle_span(example, self.tokenizer, chat, limit, fmt) if "needle" in meta else None
        if span is None:
            return meta
        compressed = len(parts[0])
        capacity = self.plan.budget.capacity_host([compressed])  # the compressed prompt holds no held-out token
        windows = self.plan.policy.protected_windows(compressed, None if capacity is None else capacity[0])
        inside = sum(max(0, min(end, span[1]) - max(start, span[0])) for start, end in windows)
        meta.update(
            needle_span=list(span),
            needle_depth=span[0] / sum(len(part) for part in parts),
            needle_in_window=inside > 0,
            needle_window_share=inside / (span[1] - span[0]),
        )
        return meta

    def _row(self, task: Task, key: str, records: list[dict[str, Any]], wall_s: float) -> Row:
        cfg, run = self.plan.cfg, self.plan
        scores = [record["score"] for record in records]
        prefill_s = sum(r["prefill_s"] for r in records)
        decode_s = sum(r["decode_s"] for r in records)
        masses = [r["attention_mass_retained"] for r in records if r["attention_mass_retained"] is not None]
        passes = [r["score_pass_s"] for r in records if r.get("score_pass_s") is not None]  # older records lack it
        n_layers = len(records[0]["kv_kept_per_head"]) if records else 0
        per_layer = [
            sum(sum(r["kv_kept_per_head"][layer]) / len(r["kv_kept_per_head"][layer]) for r in records) / len(records)
            for layer in range(n_layers)
        ]
        return Row(
            config_hash=key,
            status="ok",
            model=run.spec.name,
            policy=run.policy.name,
            label=run.policy.display_name(run.budget),
            policy_params=run.policy.params(),
            kv_masked=run.policy.needed().kv_masked,
            budget=run.budget.value if run.budget.kind == "fraction" else None,
            budget_tokens=run.budget.value if run.budget.kind == "tokens" else None,
            task=task.name,
            task_family=task.family,
            task_version=task.version,
            data_revision=getattr(task, "data_revision", None),
            protocol=cfg.protocol,
            n_examples=len(records),
            truncated_share=_mean(
                [float(r.get("n_prompt_tokens_kept", 0) < r.get("n_prompt_tokens_original", 0)) for r in records]
            ),
            score=task.aggregate(scores),
            score_breakdown=task.breakdown(scores, [record["meta"] for record in records]),
            kv_kept_fraction=_mean([r["kv_kept_fraction"] for r in records]),
            kv_kept_per_layer=per_layer,
            attention_mass_retained=_mean(masses) if masses else None,
            kv_bytes=max(r["kv_bytes"] for r in records),
            kv_payload_bytes=max(r["kv_payload_bytes"] for r in records),
            kv_bytes_decode=max(r["kv_bytes_decode"] for r in records),
            kv_bytes_full=max(r["kv_bytes_full"] for r in records),
            peak_memory_bytes=max(max(r["prefill_peak_bytes"], r["decode_peak_bytes"]) for r in records),
            peak_memory_prefill_bytes=max(r["prefill_peak_bytes"] for r in records),
            peak_memory_decode_bytes=max(r["decode_peak_bytes"] for r in records),
            peak_memory_kind=peak_kind(self.device),
            prefill_tokens_per_s=sum(r["n_prompt_tokens"] for r in records) / prefill_s if prefill_s else None,
            decode_tokens_per_s=sum(map(_decode_tokens, records)) / decode_s if decode_s else None,
            ttft_s=_mean([r["ttft_s"] for r in records]),
            score_pass_s=_mean(passes) if passes else None,
            wall_s=wall_s,
            device=self.device.type,
            dtype=str(self.dtype).removeprefix("torch."),
            attention=cfg.attention,
            compile=bool(cfg.compile),
            diagnostics=bool(cfg.diagnostics),
            batch_size=int(cfg.batch_size),
            limit=cfg.limit,
            ids=None if cfg.get("ids") is None else [str(i) for i in cfg.ids],
            seed=int(cfg.seed),
            prefill_eviction=cfg.prefill_eviction,
            chunk_size=int(cfg.chunk_size),
            max_prompt_tokens=self.prompt_limit(task),
            sweep_id=cfg.get("sweep_id"),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            git_commit=git_commit(),
            versions=versions(),
            timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def _failed_row(self, task: Task, key: str, reason: str) -> Row:
        """What a failed point records: its configuration and the one-line reason (no numbers)."""
        cfg, run = self.plan.cfg, self.plan
        return Row(
            config_hash=key,
            status="failed",
            reason=reason,
            model=run.spec.name,
            policy=run.policy.name,
            policy_params=run.policy.params(),
            budget=run.budget.value if run.budget.kind == "fraction" else None,
            budget_tokens=run.budget.value if run.budget.kind == "tokens" else None,
            task=task.name,
            task_family=task.family,
            protocol=cfg.protocol,
            seed=int(cfg.seed),
            sweep_id=cfg.get("sweep_id"),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            git_commit=git_commit(),
            timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        )


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, the reason a failed row gives."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def free_memory(device: torch.device) -> None:
    """Collect what a failed point left (cycles included) and give cached CUDA blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _decode_tokens(record: dict[str, Any]) -> int:
    """Tokens a record's decode steps produced; a record written before ``n_decode_tokens`` existed: every
    generated token but the first, which prefill produced."""
    return record.get("n_decode_tokens", max(0, record["n_new_tokens"] - 1))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    """The ids ``model.generate`` stops at: the generation config's EOS ids and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def run(cfg: DictConfig, loaded: tuple[torch.nn.Module, Any] | None = None, logger: Any = None) -> list[dict[str, Any]]:
    """Validate, load once (or use ``loaded``, a (model, tokenizer) pair), evaluate every task of the
    configuration; returns its rows (failed ones included: a task that fails at run time gets a
    ``status="failed"`` row and the other tasks still run). ``logger`` (kvbench.loggers) starts once the
    configuration is valid, before the model loads, and gets each row as soon as its task is done."""
    validated = plan(cfg, check_model=loaded is None)
    pending = [task for task in validated.tasks if not validated.store.has_row(config_hash(cfg, task))]
    finished = {config_hash(cfg, task) for task in validated.tasks} - {config_hash(cfg, task) for task in pending}
    rows = [row for row in validated.store.rows() if row["config_hash"] in finished]
    if logger is not None:
        logger.start(cfg)
        logger.log_rows(cfg, rows)
    if pending:
        runner = Runner(validated, loaded)
        for task in pending:
            row = runner.run_task(task)
            if row is not None:
                rows.append(row)
                if logger is not None:
                    logger.log_rows(cfg, [row])
    return rows
