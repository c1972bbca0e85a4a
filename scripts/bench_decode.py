"""Decode-step cost of each policy at long contexts against HF generate, prefill against HF's forward, batch 4
against batch 1 per example, and the ragged-cache layout comparison (padded + mask vs flattened var-len).

    .venv/bin/python scripts/bench_decode.py --context 4096 2048 --budget 0.3 --out results/bench

Every ``decode`` row has ``policy``, ``context``, ``ms_per_step``, ``kept_fraction``, ``host_syncs_per_step``
(counted with a TorchFunctionMode over the decode steps), its ratios to HF and, for the policies issue #16 sets
targets for, whether the target is met. ``hf_generate`` holds HF ``model.generate``'s own decode step (its
DynamicCache) at the first context and at the kept length (``hf_generate_by_context``: every context). Within
each repeat every measurement of a context runs one after another (interleaved); numbers are medians.

Writes ``decode_step_<device>.json`` and ``.md`` under ``--out``. On CPU the thread count is fixed so runs
compare. This is a benchmark, not a test: no thresholds fail it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvbench.bench import host_syncs_per_step, kvbench_run, time_hf_generate, time_kvbench
from kvbench.config import options
from kvbench.models import load, model_spec
from kvbench.policies import build
from kvbench.policies.base import Budget
from kvbench.runner import git_commit, versions

NEEDS_PARAMS = {"less"}  # needs trained kernels; benchmarked when they exist


def prompt_ids(tokenizer, n_tokens: int, data_dir: Path) -> list[int]:
    essays = "".join(p.read_text() for p in sorted((data_dir / "haystack" / "PaulGrahamEssays").glob("*.txt")))
    return tokenizer.encode(essays, add_special_tokens=False)[:n_tokens]


def policy_factory(name: str):
    return lambda: build(name)


def benchmarked_policies() -> list[str]:
    """Every policy but the full cache and those that need trained inputs (``NEEDS_PARAMS``)."""
    return [name for name in options("policy") if name != "full" and name not in NEEDS_PARAMS]


def policy_budget(name: str, fraction: float) -> Budget:
    """The benchmark's budget for a policy: ``fraction`` when the policy requires one, else none."""
    return Budget("fraction", fraction) if policy_factory(name)().needed().budget == "required" else Budget()


def write_syncs(model, tokenizer, ids: list[int], args, argv: list[str]) -> None:
    """Host syncs per decode step of every policy on the real model (its 30 layers), to ``host_syncs_cpu.json``."""
    rows = []
    for name in ["full", *benchmarked_policies()]:
        make = policy_factory(name)
        budget = policy_budget(name, args.budget)
        rows.append(
            {"policy": name, "host_syncs_per_step": host_syncs_per_step(model, tokenizer, make, budget, [ids], "cpu")}
        )
        print(rows[-1], flush=True)
    report = {"command": "python scripts/bench_decode.py " + " ".join(argv), "model": "smollm2_135m",
              "n_layers": model.config.num_hidden_layers, "prompt_tokens": len(ids), "budget": args.budget,
              "git_commit": git_commit(), "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_syncs_cpu.json").write_text(json.dumps(report, indent=2))


def ragged_layout(lengths: list[int], dim: int, group: int, repeats: int) -> dict:
    """One decode attention over KV heads of different lengths: padded to the max with a mask, or flattened
    (each head's entries stored back to back, attention run head by head over its own slice)."""
    heads = len(lengths)
    longest = max(lengths)
    query = torch.randn(1, heads * group, 1, dim)
    keys = torch.randn(1, heads, longest, dim)
    values = torch.randn(1, heads, longest, dim)
    mask = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]  # [Hkv, T]
    mask = mask.repeat_interleave(group, 0)[None, :, None, :]
    flat_k = torch.cat([keys[0, h, :n] for h, n in enumerate(lengths)])
    flat_v = torch.cat([values[0, h, :n] for h, n in enumerate(lengths)])
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]

    def padded():
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, enable_gqa=True)

    def flattened():
        outs = []
        for h in range(heads):
            k = flat_k[offsets[h] : offsets[h + 1]][None, None]
            v = flat_v[offsets[h] : offsets[h + 1]][None, None]
            outs.append(F.scaled_dot_product_attention(query[:, h * group : (h + 1) * group], k, v))
        return torch.cat(outs, 1)

    assert torch.allclose(padded(), flattened(), atol=1e-5)

    def timed(fn):
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(50):
                fn()
            samples.append((time.perf_counter() - start) / 50 * 1e6)
        return statistics.median(samples)

    entry_bytes = 2 * dim * 4
    return {
        "lengths": lengths,
        "padded_us": timed(padded),
        "flattened_us": timed(flattened),
        "padded_bytes": heads * longest * entry_bytes + heads * longest,
        "flattened_bytes": sum(lengths) * entry_bytes + 4 * (heads + 1),
    }


# The targets (#16): decode ms/step over HF generate's, at the same context or at the kept length.
TARGETS = {
    "full": ("same context", 1.05),
    "snapkv": ("kept length", 1.1),
    "streaming_llm": ("kept length", 1.1),
    "h2o": ("kept length", 1.3),
    "tova": ("kept length", 1.3),
    "corm": ("kept length", 1.3),
}
PREFILL_TARGET = 1.05  # kvbench's prefill (full cache) over HF's forward over the same tokens


def time_hf_forward(model, ids: list[int]) -> float:
    """Seconds of HF's own forward pass over ``ids`` (one pass, its DynamicCache): the prefill reference."""
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), use_cache=True)
    return time.perf_counter() - start


def measure_context(model, tokenizer, ids: list[int], names: list[str], args) -> tuple[list[dict], dict, dict]:
    """Every measurement at one context, interleaved per repeat (HF, kvbench full, each policy): medians."""
    kept_len = round(args.budget * len(ids))
    factories = {name: policy_factory(name) for name in names}
    budgets = {name: policy_budget(name, args.budget) for name in names}
    samples: dict[str, list] = {key: [] for key in ("hf", "hf_kept", "hf_forward", "full", "full_kept", *names)}
    for _ in range(args.repeats):
        samples["hf"].append(time_hf_generate(model, [ids], args.steps, "cpu").decode_ms_per_step)
        samples["hf_forward"].append(time_hf_forward(model, ids))
        samples["full"].append(
            time_kvbench(model, tokenizer, policy_factory("full"), Budget(), [ids], args.steps, "cpu")
        )
        samples["hf_kept"].append(time_hf_generate(model, [ids[:kept_len]], args.steps, "cpu").decode_ms_per_step)
        full_kept = time_kvbench(
            model, tokenizer, policy_factory("full"), Budget(), [ids[:kept_len]], args.steps, "cpu"
        )
        samples["full_kept"].append(full_kept)
        for name in names:
            samples[name].append(
                time_kvbench(model, tokenizer, factories[name], budgets[name], [ids], args.steps, "cpu")
            )
    hf = {
        "context": len(ids),
        "ms_per_step": statistics.median(samples["hf"]),
        "ms_per_step_at_kept_length": statistics.median(samples["hf_kept"]),
        "kept_length": kept_len,
    }
    full_prefill = statistics.median(t.prefill_s for t in samples["full"])
    hf_prefill = statistics.median(samples["hf_forward"])
    prefill = {"context": len(ids), "kvbench_full_s": full_prefill, "hf_forward_s": hf_prefill}
    prefill["ratio"] = full_prefill / hf_prefill
    rows = [
        {"policy": "full", "context": len(ids), "timings": samples["full"]},
        {"policy": "full", "context": kept_len, "timings": samples["full_kept"]},
        *({"policy": name, "context": len(ids), "timings": samples[name]} for name in names),
    ]
    for row in rows:
        timings = row.pop("timings")
        row["ms_per_step"] = statistics.median(t.decode_ms_per_step for t in timings)
        row["kept_fraction"] = timings[-1].kept_fraction
        row["vs_hf_same_context"] = row["ms_per_step"] / (
            hf["ms_per_step"] if row["context"] == len(ids) else hf["ms_per_step_at_kept_length"]
        )
        row["vs_hf_at_kept_length"] = row["ms_per_step"] / hf["ms_per_step_at_kept_length"]
        basis, limit = TARGETS.get(row["policy"], (None, None))
        if limit is not None and row["context"] == len(ids):
            ratio = row["vs_hf_same_context"] if basis == "same context" else row["vs_hf_at_kept_length"]
            row["target"] = {"basis": basis, "max_ratio": limit, "met": ratio <= limit}
        print(f"{row['policy']:18s} {row['context']:6d} {row['ms_per_step']:8.1f} ms/step", flush=True)
    return rows, hf, prefill


def batching(model, tokenizer, ids: list[int], args) -> list[dict]:
    """Seconds per example of a whole generation (prefill + ``steps`` new tokens) at batch 1 and at batch 4, on
    8 prompts of two lengths (as the runner batches them: sorted by length, left-padded), interleaved per
    repeat; full cache and SnapKV at the budget."""
    lengths = [len(ids) // 2 + 37 * i for i in range(4)] + [len(ids) - 53 * i for i in range(4)]
    prompts = [ids[i * 11 : i * 11 + n] for i, n in enumerate(lengths)]
    ordered = sorted(prompts, key=len)
    results = []
    for name, budget in (("full", Budget()), ("snapkv", Budget("fraction", args.budget))):
        seconds: dict[int, list[float]] = {1: [], 4: []}
        for _ in range(args.repeats):
            for size in (1, 4):
                start = time.perf_counter()
                for i in range(0, len(ordered), size):
                    kvbench_run(model, tokenizer, build(name), budget, ordered[i : i + size], args.steps + 1, "cpu")
                seconds[size].append((time.perf_counter() - start) / len(ordered))
        one, four = statistics.median(seconds[1]), statistics.median(seconds[4])
        results.append({"policy": name, "lengths": lengths, "s_per_example_batch1": one, "s_per_example_batch4": four,
                        "ratio_batch4_over_batch1": four / one})  # fmt: skip
        print(results[-1], flush=True)
    return results


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, nargs="+", default=[4096, 2048])
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("results/bench"))
    parser.add_argument("--policies", nargs="*", default=None)
    parser.add_argument("--syncs-only", action="store_true", help="count host syncs per decode step only (no timing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load(model_spec("smollm2_135m"), "cpu", torch.float32)
    ids = prompt_ids(tokenizer, max(args.context), args.data_dir)
    if args.syncs_only:
        write_syncs(model, tokenizer, ids[:512], args, argv)
        return
    names = args.policies or benchmarked_policies()
    sync_ids = [ids[:512]]  # host syncs do not depend on the context; a short prompt counts them quickly
    syncs = {}
    for name in ["full", *names]:
        budget = policy_budget(name, args.budget)
        syncs[name] = host_syncs_per_step(model, tokenizer, policy_factory(name), budget, sync_ids, "cpu")
    rows, hf_by_context, prefill = [], [], []
    for context in args.context:
        context_rows, hf, context_prefill = measure_context(model, tokenizer, ids[:context], names, args)
        for row in context_rows:
            row["host_syncs_per_step"] = syncs[row["policy"]]
        rows += context_rows
        hf_by_context.append(hf)
        prefill.append(context_prefill)
    batched = batching(model, tokenizer, ids[: max(args.context)], args)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    dim = model.config.head_dim
    ragged = [ragged_layout(lengths, dim, group, args.repeats) for lengths in ([4096, 2048, 512], [4096, 4000, 3900])]
    report = {
        "command": "python scripts/bench_decode.py " + " ".join(argv),
        "device": "cpu",
        "threads": args.threads,
        "model": "smollm2_135m",
        "budget": args.budget,
        "steps": args.steps,
        "repeats": args.repeats,
        "git_commit": git_commit(),
        "versions": versions(),
        "decode": rows,
        "hf_generate": hf_by_context[0],
        "hf_generate_by_context": hf_by_context,
        "prefill": prefill,
        "batching": batched,
        "ragged_layout": ragged,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step_cpu.json").write_text(json.dumps(report, indent=2))
    (args.out / "decode_step_cpu.md").write_text(markdown(report, args))
    print(markdown(report, args))


def markdown(report: dict, args) -> str:
    lines = [
        f"# Decode-step time on CPU ({args.threads} threads), SmolLM2-135M fp32, budget {args.budget}",
        "",
        f"Command: `{report['command']}` at commit `{report['git_commit']}`. Medians of {args.repeats} repeats; in",
        "every repeat HF generate, HF's forward, kvbench's full cache and every policy ran one after another.",
        "",
        "| context | HF generate ms/step | HF at kept length (tokens) | kvbench prefill (full) s | HF forward s | "
        f"prefill ratio (target <= {PREFILL_TARGET}) |",
        "|---|---|---|---|---|---|",
    ]
    for hf, prefill in zip(report["hf_generate_by_context"], report["prefill"], strict=True):
        lines.append(
            f"| {hf['context']} | {hf['ms_per_step']:.1f} | "
            f"{hf['ms_per_step_at_kept_length']:.1f} ({hf['kept_length']}) "
            f"| {prefill['kvbench_full_s']:.2f} | {prefill['hf_forward_s']:.2f} | {prefill['ratio']:.2f}x |"
        )
    lines += [
        "",
        "| policy | context | kept fraction | ms / decode step | vs HF at same context | vs HF at kept length "
        "| target | host syncs / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["decode"]:
        target = row.get("target")
        mark = (
            ""
            if target is None
            else f"<= {target['max_ratio']}x ({target['basis']}): {'met' if target['met'] else 'NOT met'}"
        )
        lines.append(
            f"| {row['policy']} | {row['context']} | {row['kept_fraction']:.3f} | {row['ms_per_step']:.1f} | "
            f"{row['vs_hf_same_context']:.2f}x | {row['vs_hf_at_kept_length']:.2f}x | {mark} | "
            f"{row['host_syncs_per_step']:.1f} |"
        )
    lines += ["", "Batching (8 prompts of two lengths, sorted by length, a whole generation each):", ""]
    lines += ["| policy | s / example, batch 1 | s / example, batch 4 | batch 4 / batch 1 |", "|---|---|---|---|"]
    for b in report["batching"]:
        lines.append(
            f"| {b['policy']} | {b['s_per_example_batch1']:.2f} | {b['s_per_example_batch4']:.2f} | "
            f"{b['ratio_batch4_over_batch1']:.2f}x |"
        )
    lines += ["", "Ragged layout, one decode attention (one layer, 3 KV heads, GQA 3):", ""]
    lines += [
        "| head lengths | padded+mask µs | flattened µs | padded bytes | flattened bytes |",
        "|---|---|---|---|---|",
    ]
    for r in report["ragged_layout"]:
        lines.append(
            f"| {r['lengths']} | {r['padded_us']:.0f} | {r['flattened_us']:.0f} | {r['padded_bytes']} | "
            f"{r['flattened_bytes']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
