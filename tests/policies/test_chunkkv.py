"""ChunkKV against a dense reference: whole chunks ranked by their summed (head-summed) scores, after the
scorer's window; and a wrong scorer is a one-line error naming the valid ones."""

from __future__ import annotations

import pytest
import torch

from kvbench.errors import UserError
from kvbench.policies.chunkkv import ChunkKVPolicy

from .test_snapkv_pyramidkv import cache, vote_then_evict


def test_chunkkv_keeps_the_best_whole_chunks_after_the_window():
    torch.manual_seed(0)
    n, heads, chunk, window, capacity = 22, 2, 4, 2, 12
    votes = torch.rand(1, heads, n)
    layer = cache(n, heads)
    policy = ChunkKVPolicy(scorer="snapkv", scorer_params={"window": window, "kernel": 1}, chunk_size=chunk)
    vote_then_evict(policy, layer, votes, capacity)
    # Dense reference: prefix 0..19 in chunks of 4, per-head scores shifted to a zero minimum, summed over
    # tokens and heads; best chunks taken while they fit in capacity - window = 10 entries (two chunks).
    prefix = votes[0, :, : n - window]
    shifted = prefix - prefix.min(-1, keepdim=True).values
    totals = [float(shifted[:, c : c + chunk].sum()) for c in range(0, n - window, chunk)]
    best = sorted(range(len(totals)), key=lambda c: -totals[c])[:2]
    expected = sorted([p for c in best for p in range(c * chunk, c * chunk + chunk)] + [n - 2, n - 1])
    for head in range(heads):
        assert layer.positions[0, head][layer.valid[0, head]].tolist() == expected
    assert "snapkv" not in layer.stats  # the scorer's own bookkeeping ran (a fresh vote per eviction)


def test_chunkkv_a_partial_chunk_competes_with_what_it_has():
    # Chunks of 4 over 10 keys, window 2: chunks {0..3}, {4..7}; 8, 9 are the window. Capacity 6 leaves room
    # for one chunk: the one with the higher summed vote.
    votes = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.0, 0.3, 0.0, 0.0, 0.9, 0.9])
    layer = cache(10)
    policy = ChunkKVPolicy(scorer="snapkv", scorer_params={"window": 2, "kernel": 1}, chunk_size=4)
    vote_then_evict(policy, layer, votes[None, None, :], 6)
    assert layer.positions[0, 0][layer.valid[0, 0]].tolist() == [0, 1, 2, 3, 8, 9]  # 0.4 beats 0.3


def test_chunkkv_rejects_an_unknown_or_non_scorer_policy():
    with pytest.raises(UserError, match="unknown scorer 'corm'; valid: .*snapkv"):
        ChunkKVPolicy(scorer="corm")
    with pytest.raises(UserError, match="policy.scorer_params.windw"):
        ChunkKVPolicy(scorer="snapkv", scorer_params={"windw": 3})
