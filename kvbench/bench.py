"""Timing helpers shared by the benchmarks (``scripts/bench_decode.py``, ``scripts/bench_gpu.py``).

A decode step's cost is measured as a difference: a generation of ``steps + 1`` new tokens minus one of 1 new
token, divided by ``steps``, so prefill and the first token cancel out. The same holds for HF ``generate``
(its DynamicCache), measured in the same process, interleaved with kvbench's runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.batching import collate
from kvbench.calibration import prepare
from kvbench.engine import make_engine
from kvbench.engine.generate import generate, synchronize
from kvbench.measure import HostSyncCounter
from kvbench.policies.base import Budget, Policy


@dataclass
class Timing:
    prefill_s: float
    decode_ms_per_step: float
    kept_fraction: float
    peak_bytes: int  # CUDA max allocated over the run (0 on CPU)


def kvbench_run(model, tokenizer, policy: Policy, budget: Budget, ids: list[list[int]], new_tokens: int, device):
    """One kvbench generation of ``new_tokens`` for the batch ``ids``; returns (Generation, Engine)."""
    policy.bind(tokenizer)
    prepare(policy, model, tokenizer)  # a calibration the policy declares (cached per model)
    engine = make_engine(model, policy, budget)
    batch = collate([[row, []] for row in ids], tokenizer.pad_token_id or 0, device)
    return generate(model, engine, batch, new_tokens, set(), chunk_size=1024), engine


def time_kvbench(model, tokenizer, policy_factory, budget: Budget, ids, steps: int, device) -> Timing:
    """Prefill seconds, decode ms per step (the generation's own decode clock), kept fraction, peak bytes."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out, engine = kvbench_run(model, tokenizer, policy_factory(), budget, ids, steps + 1, device)
    peak = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else 0
    return Timing(out.prefill_s, 1000 * out.decode_s / steps, float(engine.meters.kept_fraction().mean()), peak)


def time_hf_generate(model, ids: list[list[int]], steps: int, device) -> Timing:
    """HF ``model.generate`` (greedy, DynamicCache, no stop): decode ms per step by the two-length difference."""
    input_ids = torch.tensor(ids, device=device)
    mask = torch.ones_like(input_ids)

    def run(new_tokens: int) -> float:
        synchronize(torch.device(device))
        start = time.perf_counter()
        model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        synchronize(torch.device(device))
        return time.perf_counter() - start

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    one = run(1)
    many = run(steps + 1)
    peak = torch.cuda.max_memory_allocated(device) if torch.device(device).type == "cuda" else 0
    return Timing(one, 1000 * (many - one) / steps, 1.0, peak)


def host_syncs_per_step(model, tokenizer, policy_factory, budget: Budget, ids, device, steps: tuple = (2, 6)) -> float:
    """Host-blocking reads per decode step: the count of a longer generation minus a shorter one, per step."""
    kvbench_run(model, tokenizer, policy_factory(), budget, ids, 1, device)  # one-time work (calibration) uncounted
    counts = []
    for n in steps:
        with HostSyncCounter() as counter:
            kvbench_run(model, tokenizer, policy_factory(), budget, ids, n + 1, device)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / (steps[1] - steps[0])


def copy_bandwidth(device, n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of an ``n_bytes`` buffer, best of ``repeats``)."""
    src = torch.empty(n_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize(torch.device(device))
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(torch.device(device))
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def as_dict(timing: Timing) -> dict[str, Any]:
    return {
        "prefill_s": timing.prefill_s,
        "ms_per_step": timing.decode_ms_per_step,
        "kept_fraction": timing.kept_fraction,
        "peak_gib": timing.peak_bytes / 2**30,
    }
