"""Scissorhands on hand-built attention rows: over budget, drop the most often unimportant tokens of the window."""

from __future__ import annotations

import torch

from kvbench.cache import LayerCache
from kvbench.policies.scissorhands import ScissorhandsPolicy

from .hand import context


def cache(n_keys: int, heads: int = 1, dim: int = 4) -> LayerCache:
    layer = LayerCache()
    layer.append(torch.randn(1, heads, n_keys, dim), torch.randn(1, heads, n_keys, dim), torch.arange(n_keys)[None])
    return layer


def kept_positions(layer: LayerCache) -> list[int]:
    return layer.positions[0, 0][layer.valid[0, 0]].tolist()


def observe_rows(policy, layer, ctx, attention: list[list[float]], query: int) -> None:
    """One row at a time, as decode steps deliver them (query at ``query``, bar 1/(query + 1))."""
    for row in attention:
        policy.observe(layer, torch.tensor(row)[None, None, None], torch.tensor([[query]]), ctx)


def unimportant_counts(policy, layer, ctx) -> list[int]:
    return (-policy.score(layer, ctx))[0, 0].long().tolist()


def test_drops_the_most_often_unimportant_outside_the_recent_window():
    policy, layer, ctx = ScissorhandsPolicy(window=4, recent=1), cache(5), context(5, capacity=3)
    # Bar 1/5 = 0.2: key 1 is unimportant 4 times, key 2 three times, key 3 twice, key 4 (recent) always.
    rows = [
        [0.50, 0.05, 0.05, 0.30, 0.10],
        [0.40, 0.10, 0.25, 0.15, 0.10],
        [0.40, 0.10, 0.10, 0.30, 0.10],
        [0.20, 0.10, 0.10, 0.10, 0.50],
    ]
    observe_rows(policy, layer, ctx, rows, query=4)
    assert unimportant_counts(policy, layer, ctx) == [0, 4, 3, 2, 3]
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [0, 3, 4]


def test_the_count_slides_with_the_window():
    policy, layer, ctx = ScissorhandsPolicy(window=4, recent=0), cache(3), context(3, capacity=2)
    old_misses = [[0.1, 0.8, 0.1]] * 4  # bar 1/3: key 0 and key 2 unimportant
    recent_misses = [[0.1, 0.8, 0.1]] * 2 + [[0.8, 0.1, 0.1]] * 2  # keys 0 and 1 twice each, key 2 four times
    observe_rows(policy, layer, ctx, old_misses, query=2)
    observe_rows(policy, layer, ctx, [[0.45, 0.1, 0.45]] * 4, query=2)  # pushes the old rows out
    assert unimportant_counts(policy, layer, ctx) == [0, 4, 0]
    observe_rows(policy, layer, ctx, recent_misses, query=2)
    assert unimportant_counts(policy, layer, ctx) == [2, 2, 4]  # key 1's four old misses left the window
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [0, 1]


def test_a_block_of_rows_equals_rows_one_by_one():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(1, 2, 11, 9) * 2, -1)  # 11 rows > window 8: the ring wraps
    positions = torch.full((1, 11), 8)
    block, single = cache(9, heads=2), cache(9, heads=2)
    policy = ScissorhandsPolicy(window=8, recent=0)
    policy.observe(block, probs, positions, context(9, 4))
    for j in range(11):
        policy.observe(single, probs[:, :, j : j + 1], positions[:, j : j + 1], context(9, 4))
    expected = (probs[:, :, 3:] < 1 / 9).sum(2)  # the last 8 rows
    assert torch.equal(policy.score(block, context(9, 4)), -expected.float())
    assert torch.equal(policy.score(single, context(9, 4)), -expected.float())


def test_gqa_unimportant_only_if_unimportant_for_every_head():
    policy, layer, ctx = ScissorhandsPolicy(window=2, recent=0), cache(3), context(3, 2, group_size=2)
    head_a = [0.8, 0.1, 0.1]  # keys 1 and 2 below 1/3
    head_b = [0.1, 0.1, 0.8]  # keys 0 and 1 below 1/3
    policy.observe(layer, torch.tensor([[head_a], [head_b]])[None], torch.tensor([[2]]), ctx)
    assert unimportant_counts(policy, layer, ctx) == [0, 1, 0]
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [0, 2]


def test_history_is_side_state_of_window_bits_per_slot():
    layer = cache(6)
    policy = ScissorhandsPolicy(window=20)
    policy.observe(layer, torch.full((1, 1, 1, 6), 1 / 6), torch.tensor([[5]]), context(6, 6))
    assert layer.stats["scissorhands_bits"].shape == (1, 1, 6, 3)  # ceil(20 / 8) bytes per slot
