"""Perplexity of held-out text under KV policies at equal budget: the LESS paper's headline measurement
(WikiText / PG-19 perplexity against plain H2O, its Table 2; methods.md §2), here on SmolLM2.

    .venv/bin/python scripts/perplexity.py --prefix 2048 --target 256 --docs 8 --out results/less/perplexity_2k \
        --run full --run "streaming_llm budget=0.3" --run "streaming_llm budget=0.3 plus=4" \
        --run "less budget=0.3 base=lambda kernels=~/.cache/kvbench/less/smollm2_135m_lambda_0.3_w12x8192e10"

Text: the first ``--docs`` LongBench multi_news documents (from the data dir) with at least prefix + target
tokens; LESS kernels are trained on the Paul Graham essays, so this text is out of their training domain, as
WikiText is for the paper's C4 kernels. Each document's first ``--prefix`` tokens are prefilled (and compressed
by the policy); the next ``--target`` tokens are read one decode step each, the policy evicting after every step
(``kvbench.engine.generate.teacher_forced_nll``). Perplexity is exp of the mean NLL over all target tokens.

A run is ``POLICY [budget=F] [plus=N] [key=value ...]``: keys other than budget and plus override the policy's
YAML. ``plus=N`` gives the policy N more cache entries per head than the budget (the paper's "Baseline+": H2O+ or
Lambda+ at LESS's memory, whose rank-R state costs R/2 = 4 entries). Writes ``perplexity.json`` (per document NLLs
included) and ``perplexity.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kvbench.batching import collate
from kvbench.config import CONFIG_DIR, model_spec
from kvbench.engine import make_engine
from kvbench.engine.generate import teacher_forced_nll
from kvbench.models import load
from kvbench.policies import build
from kvbench.policies.base import Budget
from kvbench.results import policy_label
from kvbench.runner import git_commit, versions


@dataclass(frozen=True)
class PlusBudget(Budget):
    """A fraction budget with ``extra`` more entries: the same memory as a policy with a side state."""

    extra: int = 0

    def capacity(self, seen: torch.Tensor) -> torch.Tensor | None:
        return super().capacity(seen) + self.extra


@dataclass
class Run:
    spec: str
    policy: object
    budget: Budget
    params: dict


def parse_run(spec: str, model: str) -> Run:
    """``"less budget=0.3 base=lambda kernels=..."`` -> the policy (its YAML plus overrides) and its budget."""
    name, *pairs = spec.split()
    settings = dict(pair.split("=", 1) for pair in pairs)
    budget_value = settings.pop("budget", None)
    extra = int(settings.pop("plus", 0))
    if name == "full":
        return Run(spec, build(None), Budget(), {})
    overrides = OmegaConf.from_dotlist([f"{k}={v}" for k, v in settings.items()])
    policy_config = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "policy" / f"{name}.yaml"), overrides)
    config = OmegaConf.create({"model": {"name": model}, "policy": policy_config})
    policy = build(config.policy)
    fraction = float(budget_value) if budget_value is not None else None
    budget = PlusBudget("fraction", fraction, extra) if extra else Budget.from_config(fraction, None)
    params = {k: v for k, v in OmegaConf.to_container(config.policy, resolve=True).items() if k != "_target_"}
    return Run(spec, policy, budget, params)


def documents(data_dir: Path, tokenizer, n_tokens: int, n_docs: int) -> list[list[int]]:
    """The first ``n_docs`` multi_news contexts with at least ``n_tokens`` tokens, cut to exactly that many."""
    out = []
    with open(data_dir / "longbench" / "multi_news.jsonl") as lines:
        for line in lines:
            ids = tokenizer.encode(json.loads(line)["context"], add_special_tokens=False)
            if len(ids) >= n_tokens:
                out.append(ids[:n_tokens])
            if len(out) == n_docs:
                return out
    raise SystemExit(f"only {len(out)} multi_news documents have {n_tokens} tokens; lower --docs or --prefix")


def evaluate(model, tokenizer, run: Run, docs: list[list[int]], prefix: int, batch_size: int) -> dict:
    """Per-document mean NLL, perplexity over all target tokens, kept fraction and peak cache bytes of one run
    (keys, values and side state such as LESS's; overall, i.e. the whole prompt before compression, and while
    reading the targets)."""
    run.policy.bind(tokenizer)
    nll, kept, peak, decode_peak = [], [], 0, 0
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        engine = make_engine(model, run.policy, run.budget)
        batch = collate([[doc[:prefix], []] for doc in chunk], tokenizer.pad_token_id, "cpu")
        targets = torch.tensor([doc[prefix:] for doc in chunk])
        nll.append(teacher_forced_nll(model, engine, batch, targets, chunk_size=1024))
        kept += engine.meters.kept_fraction().tolist()
        peak = max(peak, engine.meters.peak_nbytes)
        decode_peak = max(decode_peak, engine.meters.peak_decode_nbytes)
    nll = torch.cat(nll)
    return {
        "run": run.spec,
        "policy": policy_label(run.spec.split()[0], run.params),
        "budget": run.budget.value,
        "plus": getattr(run.budget, "extra", 0),
        "perplexity": math.exp(float(nll.double().mean())),
        "doc_mean_nll": nll.double().mean(1).tolist(),
        "kept_fraction": sum(kept) / len(kept),
        "peak_cache_bytes": peak,
        "peak_decode_cache_bytes": decode_peak,
    }


def paired_lines(rows: list[dict]) -> list[str]:
    """For every LESS run, on how many documents its mean NLL is below each other run at the same budget."""
    out = []
    for less in (row for row in rows if row["run"].split()[0] == "less"):
        for other in rows:
            if other["run"].split()[0] != "less" and other["budget"] == less["budget"]:
                pairs = list(zip(less["doc_mean_nll"], other["doc_mean_nll"], strict=True))
                wins = sum(a < b for a, b in pairs)
                out.append(
                    f"- `{less['run']}` has a lower NLL than `{other['run']}` on {wins} of {len(pairs)} documents."
                )
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="POLICY [budget=F] [plus=N] [key=value ...]")
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--target", type=int, default=256)
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    commit = git_commit()  # the code that runs, before this run writes anything
    runs = [parse_run(spec, args.model) for spec in args.run]
    model, tokenizer = load(model_spec(args.model), "cpu", torch.float32)
    docs = documents(args.data_dir, tokenizer, args.prefix + args.target, args.docs)
    rows = []
    for run in runs:
        rows.append(evaluate(model, tokenizer, run, docs, args.prefix, args.batch_size))
        print(f"{run.spec}: perplexity {rows[-1]['perplexity']:.3f}, kept {rows[-1]['kept_fraction']:.3f}", flush=True)
    report = {
        "command": "python scripts/perplexity.py " + " ".join(f"'{a}'" if " " in a else a for a in argv),
        "model": args.model,
        "text": "LongBench multi_news contexts",
        "prefix_tokens": args.prefix,
        "target_tokens": args.target,
        "docs": args.docs,
        "device": "cpu",
        "git_commit": commit,
        "versions": versions(),
        "runs": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perplexity.json").write_text(json.dumps(report, indent=2))
    full = next((row["perplexity"] for row in rows if row["run"] == "full"), math.nan)
    lines = [
        f"# Perplexity, {args.model}: {args.docs} multi_news documents, {args.prefix}-token prefix (compressed), "
        f"next {args.target} tokens read one decode step each",
        "",
        f"Command: `{report['command']}` at commit `{report['git_commit']}`.",
        "",
        "| run | budget | plus | kept fraction | peak decode cache bytes (KV + side state) | perplexity | vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['budget'] if row['budget'] is not None else '-'} | {row['plus']} | "
            f"{row['kept_fraction']:.3f} | {row['peak_decode_cache_bytes']} | {row['perplexity']:.3f} | "
            f"{100 * (row['perplexity'] / full - 1):+.1f}% |"
        )
    lines += ["", *paired_lines(rows)]
    (args.out / "perplexity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
