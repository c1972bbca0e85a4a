"""CORM's own rule on hand-built attention rows: evict what was minor for w straight queries, outside the last r."""

from __future__ import annotations

import torch

from kvbench.cache import LayerCache
from kvbench.policies.corm import CORMPolicy

from .hand import context


def cache(n_keys: int, heads: int = 1, dim: int = 4) -> LayerCache:
    layer = LayerCache()
    layer.append(torch.randn(1, heads, n_keys, dim), torch.randn(1, heads, n_keys, dim), torch.arange(n_keys)[None])
    return layer


def rows(*attention: list[float]) -> torch.Tensor:
    """Attention rows [1, 1, q, T] from lists (each row is one query)."""
    return torch.tensor(attention)[None, None]


def kept_positions(layer: LayerCache) -> list[int]:
    return layer.positions[0, 0][layer.valid[0, 0]].tolist()


# 8 keys, queries at step t = 8 (bar 1/8 = 0.125); key 1 minor for all 3 queries, key 2 important once
# (the middle query), keys 6 and 7 always minor but among the last r = 2.
ROWS = [
    [0.50, 0.05, 0.05, 0.15, 0.05, 0.10, 0.05, 0.05],
    [0.40, 0.05, 0.20, 0.05, 0.15, 0.05, 0.05, 0.05],
    [0.40, 0.05, 0.05, 0.15, 0.15, 0.15, 0.00, 0.05],
]


def test_evicts_exactly_the_long_term_minor_keys_outside_the_last_r():
    policy, layer, ctx = CORMPolicy(w=3, r=2), cache(8), context(8)
    policy.observe(layer, rows(*ROWS), torch.full((1, 3), 7), ctx)
    assert layer.stat("corm_streak", torch.int16)[0, 0].tolist() == [0, 3, 1, 0, 0, 0, 3, 3]
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [0, 2, 3, 4, 5, 6, 7]


def test_two_minor_queries_are_not_enough_and_importance_resets_the_streak():
    policy, layer, ctx = CORMPolicy(w=3, r=2), cache(8), context(8)
    policy.observe(layer, rows(*ROWS[:2]), torch.full((1, 2), 7), ctx)
    policy.evict(layer, ctx)
    assert kept_positions(layer) == list(range(8))
    policy.observe(layer, rows(ROWS[2]), torch.full((1, 1), 7), ctx)  # key 2 minor again: streak 1, not 3
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [0, 2, 3, 4, 5, 6, 7]


def test_block_update_equals_the_row_by_row_rule():
    torch.manual_seed(0)
    n_keys, n_rows = 12, 7
    probs = torch.softmax(torch.randn(1, 2, n_rows, n_keys) * 2, -1)
    positions = torch.arange(n_keys - n_rows, n_keys)[None]  # queries 5..11; later keys unseen by earlier rows
    probs = probs.masked_fill(torch.arange(n_keys) > positions[0, :, None], 0.0)
    for threshold in ("step", "cache"):
        block, single = cache(n_keys, heads=2), cache(n_keys, heads=2)
        policy = CORMPolicy(w=4, r=0, threshold=threshold)
        policy.observe(block, probs, positions, context(n_keys))
        for j in range(n_rows):
            policy.observe(single, probs[:, :, j : j + 1], positions[:, j : j + 1], context(n_keys))
        expected = torch.zeros(2, n_keys, dtype=torch.long)  # the spec's loop, one query and key at a time
        for j, query in enumerate(positions[0].tolist()):
            for head in range(2):
                for key in range(query + 1):
                    bar = 1 / (query + 1)  # both thresholds: the cache is full, the query sees t keys
                    minor = float(probs[0, head, j, key]) < bar
                    expected[head, key] = expected[head, key] + 1 if minor else 0
        assert torch.equal(block.stat("corm_streak", torch.int16)[0].long(), expected), threshold
        assert torch.equal(single.stat("corm_streak", torch.int16), block.stat("corm_streak", torch.int16))


def test_gqa_any_head_of_the_group_keeps_a_key():
    policy, layer, ctx = CORMPolicy(w=2, r=0), cache(4), context(4, group_size=2)
    head_a = [[0.7, 0.1, 0.1, 0.1]] * 2  # key 1 minor for head a (bar 1/4)
    head_b = [[0.1, 0.1, 0.7, 0.1]] * 2  # key 1 minor for head b too; key 0 minor only here
    probs = torch.tensor([head_a, head_b])[None]  # [1, 2, 2, 4]
    policy.observe(layer, probs, torch.full((1, 2), 3), ctx)
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [0, 2]


def test_capped_mode_evicts_the_longest_minor_keys_and_never_the_last_r():
    policy, layer = CORMPolicy(w=10, r=2), cache(8)
    streak = layer.stat("corm_streak", torch.int16)
    streak[0, 0] = torch.tensor([0, 6, 2, 9, 1, 4, 9, 9], dtype=torch.int16)
    policy.evict(layer, context(8))  # native: nothing reached w
    assert kept_positions(layer) == list(range(8))
    policy.evict(layer, context(8, capacity=5))  # drop the 3 highest streaks outside positions 6, 7
    assert kept_positions(layer) == [0, 2, 4, 6, 7]


def test_capped_mode_applies_the_rule_first():
    policy, layer = CORMPolicy(w=3, r=1), cache(6)
    layer.stat("corm_streak", torch.int16)[0, 0] = torch.tensor([3, 0, 5, 1, 0, 7], dtype=torch.int16)
    policy.evict(layer, context(6, capacity=5))  # keys 0 and 2 are long-term minor; 4 left, under the cap
    assert kept_positions(layer) == [1, 3, 4, 5]


def test_prefill_none_observes_no_prompt_rows():
    assert CORMPolicy(w=7).needed().query_rows == 7 and CORMPolicy(prefill="none").needed().query_rows == 0


def test_cache_threshold_uses_the_keys_held():
    layer = LayerCache()
    layer.append(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.tensor([[0, 3, 5, 7]]))
    row = rows([0.2, 0.2, 0.3, 0.3])
    CORMPolicy(threshold="step").observe(layer, row, torch.full((1, 1), 7), context(8))  # bar 1/8
    assert layer.stat("corm_streak", torch.int16)[0, 0].tolist() == [0, 0, 0, 0]
    CORMPolicy(threshold="cache").observe(layer, row, torch.full((1, 1), 7), context(8))  # bar 1/4
    assert layer.stat("corm_streak", torch.int16)[0, 0].tolist() == [1, 1, 0, 0]
