"""The library API: kvbench on a model already loaded in Python, without the CLI.

``evaluate`` composes the same Hydra config as ``kvbench ...`` and runs it through ``kvbench.runner`` on the given
model, so it returns the rows the CLI writes. ``generate`` compresses and decodes free prompts under one policy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from kvbench.batching import collate
from kvbench.calibration import prepare
from kvbench.config import CONFIG_DIR, check_option
from kvbench.engine import make_engine
from kvbench.engine.generate import generate as decode
from kvbench.policies import build
from kvbench.policies.base import Budget
from kvbench.runner import _eos_ids, run


def _override(key: str, value: Any) -> str:
    if value is None:
        return f"{key}=null"
    if isinstance(value, list | tuple):
        return f"{key}=[{','.join(str(item) for item in value)}]"
    return f"{key}={value}"


def _config(policy: str | None, budget: float | None, task: str | None, overrides: dict[str, Any]):
    args = [_override("budget", budget)] + [_override(key, value) for key, value in overrides.items()]
    if policy is not None:
        check_option("policy", policy)
        args.append(f"+policy={policy}")
    if task is not None:
        check_option("task", task)
        args.append(f"task={task}")
    if isinstance(overrides.get("model"), str):
        check_option("model", overrides["model"])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=args)


def _prepare(model: torch.nn.Module, tokenizer: Any) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.eval()


def evaluate(
    model: torch.nn.Module,
    tokenizer: Any,
    policy: str | None = "snapkv",
    budget: float | None = 0.3,
    task: str = "longbench/qasper",
    results_dir: str | None = None,
    model_config: str = "hf",
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` on ``task`` under ``policy`` at ``budget`` (a fraction; ``policy=None`` is the full cache);
    returns one row per task, as ``kvbench`` writes them.

    ``model_config`` names the model preset whose prompt length and chat setting apply (e.g.
    ``"llama3_1_8b_instruct"``; its weights are not loaded), ``overrides`` are config keys (``limit=5``,
    ``protocol="query_agnostic"``, ``**{"model.max_prompt_tokens": 4000}``). ``results_dir=None`` writes nothing.
    """
    parameter = next(model.parameters())
    overrides = {"device": parameter.device.type, "dtype": str(parameter.dtype).removeprefix("torch."), **overrides}
    overrides["model"] = model_config
    overrides.setdefault("progress", False)
    _prepare(model, tokenizer)
    with tempfile.TemporaryDirectory() as scratch:
        cfg = _config(policy, budget, task, {**overrides, "results_dir": results_dir or scratch})
        return run(cfg, loaded=(model, tokenizer))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[str],
    policy: str | None = "snapkv",
    budget: float | None = 0.3,
    max_new_tokens: int = 64,
    chunk_size: int = 1024,
) -> list[dict[str, Any]]:
    """Greedy continuations of ``prompts`` (used as given: apply a chat template first if wanted) with the KV cache
    under ``policy`` at ``budget``; each result holds ``text``, ``kv_kept_fraction`` and ``kv_bytes`` (the peak the
    cache held for the batch)."""
    cfg = _config(policy, budget, None, {})
    chosen = build(cfg.get("policy"))
    _prepare(model, tokenizer)
    chosen.bind(tokenizer)
    prepare(chosen, model, tokenizer, Path(cfg.data_dir).expanduser())
    engine = make_engine(model, chosen, Budget.from_config(cfg.budget, None))
    device = next(model.parameters()).device
    encoded = [[tokenizer.encode(prompt, add_special_tokens=True), []] for prompt in prompts]
    batch = collate(encoded, tokenizer.pad_token_id, device)
    out = decode(model, engine, batch, max_new_tokens, _eos_ids(model, tokenizer), chunk_size=chunk_size)
    kept = engine.meters.kept_fraction()
    return [
        {
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "kv_kept_fraction": float(kept[row]),
            "kv_bytes": engine.meters.peak_nbytes,
        }
        for row, tokens in enumerate(out.tokens)
    ]
