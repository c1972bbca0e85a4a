"""Decode-step cost of each policy at a long context, against the full cache at the same context and at the
same kept length; plus the ragged-cache layout comparison (padded + mask vs flattened var-len).

    .venv/bin/python scripts/bench_decode.py --context 4096 --budget 0.3 --out results/bench

Every ``decode`` row has ``policy``, ``context``, ``ms_per_step``, ``kept_fraction`` and
``host_syncs_per_step`` (counted with a TorchFunctionMode over the decode steps); ``hf_generate`` holds HF
``model.generate``'s own decode step at the same context and at the kept length, measured in the same run.

Writes ``decode_step_<device>.json`` and ``.md`` under ``--out``. Numbers are medians over repeats; on CPU the
thread count is fixed so runs compare. This is a benchmark, not a test: no thresholds.
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

from kvbench.bench import host_syncs_per_step, time_hf_generate, time_kvbench
from kvbench.config import model_spec, options
from kvbench.models import load
from kvbench.policies import build
from kvbench.policies.base import Budget
from kvbench.runner import git_commit, versions

NEEDS_PARAMS = {"less"}  # needs trained kernels; benchmarked when they exist


def prompt_ids(tokenizer, n_tokens: int, data_dir: Path) -> list[int]:
    essays = "".join(p.read_text() for p in sorted((data_dir / "haystack" / "PaulGrahamEssays").glob("*.txt")))
    return tokenizer.encode(essays, add_special_tokens=False)[:n_tokens]


def policy_factory(name: str):
    return lambda: build(name)


def write_syncs(model, tokenizer, ids: list[int], args, argv: list[str]) -> None:
    """Host syncs per decode step of every policy on the real model (its 30 layers), to ``host_syncs_cpu.json``."""
    rows = []
    for name in ["full", *[n for n in options("policy") if n != "full" and n not in NEEDS_PARAMS]]:
        make = policy_factory(name)
        budget = Budget("fraction", args.budget) if make().needed().budget == "required" else Budget()
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


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=4096)
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
    ids = prompt_ids(tokenizer, args.context, args.data_dir)
    if args.syncs_only:
        write_syncs(model, tokenizer, ids[:512], args, argv)
        return
    kept_len = round(args.budget * args.context)
    budget = Budget("fraction", args.budget)
    # HF generate and kvbench's full cache, at the context and at the kept length, interleaved per repeat.
    samples: dict[str, list[float]] = {"hf": [], "hf_kept": [], "full": [], "full_kept": []}
    for _ in range(args.repeats):
        samples["hf"].append(time_hf_generate(model, [ids], args.steps, "cpu").decode_ms_per_step)
        samples["full"].append(
            time_kvbench(model, tokenizer, policy_factory("full"), Budget(), [ids], args.steps, "cpu")
        )
        samples["hf_kept"].append(time_hf_generate(model, [ids[:kept_len]], args.steps, "cpu").decode_ms_per_step)
        kept_ids = [ids[:kept_len]]
        samples["full_kept"].append(
            time_kvbench(model, tokenizer, policy_factory("full"), Budget(), kept_ids, args.steps, "cpu")
        )
    hf_ms, hf_kept_ms = statistics.median(samples["hf"]), statistics.median(samples["hf_kept"])
    base_ms = statistics.median(t.decode_ms_per_step for t in samples["full"])
    short_ms = statistics.median(t.decode_ms_per_step for t in samples["full_kept"])
    sync_ids = [ids[:512]]  # host syncs do not depend on the context; a short prompt counts them quickly
    full_syncs = host_syncs_per_step(model, tokenizer, policy_factory("full"), Budget(), sync_ids, "cpu")
    rows = [
        {"policy": "full", "context": args.context, "ms_per_step": base_ms, "kept_fraction": 1.0},
        {"policy": "full", "context": kept_len, "ms_per_step": short_ms, "kept_fraction": 1.0},
    ]
    for row in rows:
        row["host_syncs_per_step"] = full_syncs
    names = args.policies or [n for n in options("policy") if n != "full" and n not in NEEDS_PARAMS]
    for name in names:
        make = policy_factory(name)
        policy_budget = budget if make().needed().budget == "required" else Budget()
        timings = [
            time_kvbench(model, tokenizer, make, policy_budget, [ids], args.steps, "cpu") for _ in range(args.repeats)
        ]
        ms = statistics.median(t.decode_ms_per_step for t in timings)
        kept = timings[-1].kept_fraction
        syncs = host_syncs_per_step(model, tokenizer, make, policy_budget, sync_ids, "cpu")
        rows.append(
            {
                "policy": name,
                "context": args.context,
                "ms_per_step": ms,
                "kept_fraction": kept,
                "host_syncs_per_step": syncs,
            }
        )
        print(f"{name:16s} {ms:8.1f} ms/step  kept {kept:.3f}  syncs/step {syncs:.1f}", flush=True)
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
        "git_commit": git_commit(),
        "versions": versions(),
        "decode": rows,
        "hf_generate": {"ms_per_step": hf_ms, "ms_per_step_at_kept_length": hf_kept_ms, "kept_length": kept_len},
        "ragged_layout": ragged,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_step_cpu.json").write_text(json.dumps(report, indent=2))
    lines = [
        f"# Decode-step time on CPU ({args.threads} threads), SmolLM2-135M fp32, budget {args.budget}",
        "",
        f"Command: `{report['command']}` at commit `{report['git_commit']}`.",
        "",
        f"HF generate (DynamicCache), same run, interleaved: {hf_ms:.1f} ms/step at {args.context} tokens, "
        f"{hf_kept_ms:.1f} ms/step at the kept length {kept_len}.",
        "",
        "| policy | context | kept fraction | ms / decode step | vs HF at same context | vs HF at kept length "
        "| host syncs / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['policy']} | {row['context']} | {row['kept_fraction']:.3f} | {row['ms_per_step']:.1f} | "
            f"{row['ms_per_step'] / hf_ms:.2f}x | {row['ms_per_step'] / hf_kept_ms:.2f}x | "
            f"{row['host_syncs_per_step']:.1f} |"
        )
    lines += ["", "Ragged layout, one decode attention (one layer, 3 KV heads, GQA 3):", ""]
    lines += [
        "| head lengths | padded+mask µs | flattened µs | padded bytes | flattened bytes |",
        "|---|---|---|---|---|",
    ]
    for r in ragged:
        lines.append(
            f"| {r['lengths']} | {r['padded_us']:.0f} | {r['flattened_us']:.0f} | {r['padded_bytes']} | "
            f"{r['flattened_bytes']} |"
        )
    (args.out / "decode_step_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
