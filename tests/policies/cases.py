"""One line per policy: the config name and the tokens it promises to keep (checked by the matrix tests).

``protected(policy, positions, seen, capacity)`` returns the positions [B, Hkv, T] bool mask that must survive
an eviction (given the positions held before it), or None when the policy promises nothing.
"""

from __future__ import annotations

import torch


def _sinks(policy, positions, seen, capacity):
    return positions < min(policy.n_sink, int(capacity.min()))


def _recent(width):
    def keep(policy, positions, seen, capacity):
        window = width(policy, capacity)
        return (positions >= (seen - window)[:, None, None]) & (positions < seen[:, None, None])

    return keep


def _streaming(policy, positions, seen, capacity):
    """DuoAttention's streaming window (every head keeps it; retrieval heads keep everything)."""
    width = policy.n_sink + policy.recent
    shrunk = capacity < torch.clamp(seen, max=width)
    sink = torch.where(shrunk, capacity * policy.n_sink // width, policy.n_sink)
    recent = torch.where(shrunk, capacity - sink, policy.recent)
    window = _recent(lambda p, c: recent)
    return (positions < sink[:, None, None]) | window(policy, positions, seen, capacity)


POLICIES = {
    "random": None,
    "knorm": None,
    "streaming_llm": _sinks,
    "h2o": _recent(lambda p, c: torch.floor(c * p.recent_fraction).long()),
    "tova": None,
    "snapkv": _recent(lambda p, c: torch.where(c >= p.window, p.window, 0)),
    "pyramidkv": _recent(lambda p, c: torch.where(c >= p.window, p.window, 0)),
    "corm": _recent(lambda p, c: torch.where(c >= p.r, p.r, 0)),
    "scissorhands": _recent(lambda p, c: torch.where(c >= p.recent, p.recent, 0)),
    "keydiff": None,
    "expected_attention": _sinks,
    "kvzip": _sinks,
    "adakv": _recent(lambda p, c: torch.where(c >= p.inner.window, p.inner.window, 0)),
    "chunkkv": _recent(lambda p, c: torch.where(c >= p.inner.window, p.inner.window, 0)),
    "duoattention": _streaming,
    "fixed_capacity": lambda p, *a: (_sinks if p.rule == "sliding_window" else _recent(lambda p, c: 1))(p, *a),
}

# Parameters under which a policy at budget 1.0 must equal the full cache (CORM evicts by its own rule at any
# budget; nothing can be minor for w consecutive queries when w exceeds the sequence). FastGen is budget-free (no
# entry in POLICIES): with T = 1 every head is full.
FULL_EQUIVALENT = {"corm": {"w": 100000}, "fastgen": {"recovery": 1.0}}

# Head-adaptive policies: the budget holds per (layer, example), capacity x Hkv over its KV heads; a single head
# may hold more than the capacity.
LAYER_BUDGET = {"adakv", "duoattention"}

# Layer-budget policies whose heads are uneven at budget 0.3 on the memory test's prompts (the bytes show the
# longest heads). DuoAttention's are even there: with the tiny model's 2 KV heads a retrieval head needs a budget
# over 1/2, so every head streams (tests/policies/test_duoattention.py checks the uneven case).
RAGGED = {"adakv"}

# Fields the matrix sets: a DuoAttention calibration on 2 prompts of 512 tokens keeps SmolLM2's under 10 s on one
# core. (The invariant test's prompts, 35-220 tokens, are shorter than its 64 + 256 window, so they never get a
# retrieval head: test_duoattention.py runs the same checks with a 4 + 28 window.)
PARAMS = {"duoattention": {"calibration_prompts": 2, "calibration_tokens": 512}}

# Policies that may leave part of the capacity unused, and how many entries per layer: ChunkKV keeps whole chunks.
UNDERFILL = {"chunkkv": lambda p: p.chunk_size - 1}

# Configs the matrix does not run, and why (each is tested in its own file).
ELSEWHERE = {
    "full": "the reference every matrix test compares with",
    "less": "needs trained kernels: tests/policies/test_less.py builds them",
}

# Side state (positions, statistics, policy state) allowed beside the KV bytes, as a share of them. The default
# covers int32 positions plus a float score per slot. Scissorhands keeps an exact history of the last 400
# attention rows: 400 bits = 50 bytes per slot, 20% of the tiny test model's 256 bytes of fp32 K+V per slot
# (10% of SmolLM2's 512; about 5% for a bf16 model with head dim 128). It is counted in kv_bytes.
# Expected Attention holds its window of the last 64 queries (before RoPE, fp32): 64 x H x D floats per example
# and layer, 29% of the tiny model's fp32 K+V at its 221 kept slots (H = 2 Hkv, 737-token prompt); it falls as
# the cache grows (about 7% for SmolLM2 at 900 kept slots: 64 x 9 heads against 2 x 3 KV heads x 900).
SIDE_STATE = {"scissorhands": 0.25, "expected_attention": 0.35}
DEFAULT_SIDE_STATE = 0.05
