"""A small synthetic results dir with the runner's row and prediction schemas (no model involved).

One model, four LongBench tasks (one Chinese) and passkey (examples at 2k and 4k), and the policies the paper
figures need: the full cache, SnapKV and H2O at fractional budgets, LESS (wrapping H2O), StreamingLLM at token
budgets, CORM and FastGen without a budget. Scores fall with the budget so curves have a shape;
H2O/LESS/CORM/FastGen keep different fractions per head (ragged). A second, nested ``results.jsonl`` repeats one
row with an older timestamp (de-duplication).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from kvbench.labels import display_name

MODEL = "tiny_random_llama"
TASKS = ("longbench/qasper", "longbench/hotpotqa", "longbench/trec", "longbench/dureader", "passkey")
N_LAYERS, N_KV_HEADS = 4, 2
FULL_BYTES = 4_000_000

# (policy, params, budget, budget_tokens, kv_masked, ragged, attention mass available)
SETTINGS: list[tuple[str, dict[str, Any], float | None, int | None, bool, bool, bool]] = [
    ("full", {}, None, None, False, False, True),
    *[("snapkv", {"window": 32, "kernel": 7}, b, None, False, False, True) for b in (0.1, 0.3, 0.5)],
    *[("h2o", {"recent_fraction": 0.5}, b, None, False, True, True) for b in (0.1, 0.3, 0.5)],
    *[("less", {"base": "h2o", "recent_fraction": 0.5, "rank": 8}, b, None, False, True, True) for b in (0.1, 0.3)],
    *[("streaming_llm", {"n_sink": 4}, None, t, False, False, False) for t in (64, 128)],
    *[("corm", {"w": w, "r": 256}, None, None, False, True, True) for w in (128, 256)],
    *[("fastgen", {"recovery": t, "r_l": 0.3, "r_f": 0.3}, None, None, True, True, True) for t in (0.91, 0.98)],
]


def _kept(policy: str, params: dict[str, Any], budget: float | None, tokens: int | None, n_prompt: int) -> float:
    if policy == "full":
        return 1.0
    if budget is not None:
        return budget
    if tokens is not None:
        return min(1.0, tokens / n_prompt)
    if policy == "corm":  # compression grows with length, as in CORM's Fig. 4
        return float(np.clip(params["w"] / 256 * 800 / n_prompt, 0.05, 1.0))
    return 1.0 - {0.91: 0.55, 0.98: 0.2}[params["recovery"]]


def _config_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _record(rng, index: int, task: str, n_prompt: int, kept: float, ragged: bool, mass: bool, quality: float):
    heads = np.full((N_LAYERS, N_KV_HEADS), kept)
    if ragged:
        heads = np.clip(heads + rng.normal(0, 0.1, heads.shape) + np.linspace(0.1, -0.1, N_LAYERS)[:, None], 0, 1)
    return {
        "id": f"{task}-{index}",
        "prediction": f"answer {index}",
        "answers": [f"answer {index}"],
        "score": float(np.clip(quality + rng.normal(0, 0.15), 0, 1)),
        "meta": {"length": 2048 * (1 + index % 2), "depth": (0.25, 0.5, 0.75)[index // 2 % 3]}
        if task == "passkey"
        else {},
        "n_prompt_tokens": n_prompt,
        "n_prompt_tokens_original": n_prompt,
        "n_prompt_tokens_kept": n_prompt,
        "n_new_tokens": 8,
        "n_decode_tokens": 7,
        "kv_kept_fraction": float(heads.mean()),
        "kv_kept_per_head": heads.tolist(),
        "attention_mass_retained": float(min(1.0, 0.5 + kept / 2)) if mass else None,
        "kv_bytes": int(FULL_BYTES * kept) + 1000,
        "kv_payload_bytes": int(FULL_BYTES * kept),
        "kv_bytes_decode": int(FULL_BYTES * kept) + 1000,
        "kv_bytes_full": FULL_BYTES,
        "kv_bytes_batch": int(FULL_BYTES * kept) + 1000,
        "prefill_s": n_prompt / 20_000,
        "decode_s": 8 / (150 + 50 * (1 - kept)),
        "ttft_s": n_prompt / 20_000,
        "score_pass_s": None,
        "prefill_peak_bytes": 400_000_000 + 2 * FULL_BYTES,
        "decode_peak_bytes": 380_000_000 + int(FULL_BYTES * kept),
        "policy_diagnostics": None,
        "batch_size": 1,
    }


def row(config_hash: str, policy: str, params: dict[str, Any], task: str, records: list[dict[str, Any]], **extra):
    """A results row with every key ``Runner._row`` writes, computed from ``records`` as the runner does."""
    scores = [r["score"] for r in records]
    masses = [r["attention_mass_retained"] for r in records if r["attention_mass_retained"] is not None]
    prefill_s, decode_s = sum(r["prefill_s"] for r in records), sum(r["decode_s"] for r in records)
    values = {
        "config_hash": config_hash,
        "status": "ok",
        "model": MODEL,
        "policy": policy,
        "label": display_name(
            policy, params, extra.get("budget") is not None or extra.get("budget_tokens") is not None
        ),
        "policy_params": params,
        "kv_masked": False,
        "budget": None,
        "budget_tokens": None,
        "task": task,
        "task_family": "synthetic" if task == "passkey" else "longbench",
        "task_version": "1",
        "data_revision": None,
        "protocol": "official",
        "n_examples": len(records),
        "truncated_share": 0.0,
        "score": 100 * sum(scores) / len(scores),
        "score_breakdown": {},
        "kv_kept_fraction": sum(r["kv_kept_fraction"] for r in records) / len(records),
        "kv_kept_per_layer": np.mean([r["kv_kept_per_head"] for r in records], axis=(0, 2)).tolist(),
        "attention_mass_retained": sum(masses) / len(masses) if masses else None,
        "kv_bytes": max(r["kv_bytes"] for r in records),
        "kv_payload_bytes": max(r["kv_payload_bytes"] for r in records),
        "kv_bytes_decode": max(r["kv_bytes_decode"] for r in records),
        "kv_bytes_full": FULL_BYTES,
        "peak_memory_bytes": max(max(r["prefill_peak_bytes"], r["decode_peak_bytes"]) for r in records),
        "peak_memory_prefill_bytes": max(r["prefill_peak_bytes"] for r in records),
        "peak_memory_decode_bytes": max(r["decode_peak_bytes"] for r in records),
        "peak_memory_kind": "cpu_rss_high_water_per_phase",
        "prefill_tokens_per_s": sum(r["n_prompt_tokens"] for r in records) / prefill_s,
        "decode_tokens_per_s": sum(r["n_decode_tokens"] for r in records) / decode_s,
        "ttft_s": sum(r["ttft_s"] for r in records) / len(records),
        "score_pass_s": None,
        "wall_s": prefill_s + decode_s,
        "device": "cpu",
        "dtype": "float32",
        "attention": "sdpa",
        "compile": False,
        "diagnostics": False,
        "batch_size": 1,
        "limit": len(records),
        "ids": None,
        "seed": 0,
        "prefill_eviction": "whole",
        "chunk_size": 1024,
        "max_prompt_tokens": 3500,
        "sweep_id": "sweep-fixture",
        "slurm_job_id": None,
        "git_commit": "0" * 40,
        "versions": {"python": "3.11", "torch": "2", "transformers": "5", "kvbench": "0.1.0"},
        "timestamp": "2026-01-02T00:00:00+00:00",
    }
    return {**values, **extra}


def _write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """JSON lines in one write (the store's locked, fsynced appends would only slow the tests down)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def write_results(root: Path, n_examples: int = 12) -> Path:
    """Write the fixture under ``root`` (``root/results.jsonl`` + predictions, and ``root/old/``); returns root."""
    root = Path(root)
    rng = np.random.default_rng(0)
    rows = []
    for policy, params, budget, tokens, masked, ragged, mass in SETTINGS:
        for task in TASKS:
            key = _config_hash(policy, params, budget, tokens, task)
            # Quality rises with the kept fraction; LESS sits between H2O and the full cache.
            kept_nominal = _kept(policy, params, budget, tokens, 2000)
            bonus = {"less": 0.1, "snapkv": 0.05}.get(policy, 0.0)
            quality = min(0.9, 0.3 + 0.6 * kept_nominal + bonus)
            records = []
            for i in range(n_examples):
                n_prompt = int(rng.integers(500, 4000))
                kept = _kept(policy, params, budget, tokens, n_prompt)
                records.append(_record(rng, i, task, n_prompt, kept, ragged, mass, quality))
            _write_lines(root / "predictions" / f"{key}.jsonl", records)
            rows.append(row(key, policy, params, task, records, budget=budget, budget_tokens=tokens, kv_masked=masked))
    _write_lines(root / "results.jsonl", rows)
    # The same configuration written earlier elsewhere, with another score: load keeps the later one.
    _write_lines(root / "old" / "results.jsonl", [{**rows[0], "score": -1.0, "timestamp": "2025-01-01T00:00:00+00:00"}])
    return root
