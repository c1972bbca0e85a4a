"""SnapKV and PyramidKV on hand-built votes: pooling over the prefix only, and the window kept in every layer."""

from __future__ import annotations

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import Context
from kvbench.policies.pyramidkv import PyramidKVPolicy
from kvbench.policies.snapkv import SnapKVPolicy


def prefill_context(seen: int, capacity: int, layer_idx: int = 0, n_layers: int = 1) -> Context:
    return Context(
        layer_idx=layer_idx,
        n_layers=n_layers,
        phase="prefill",
        seen=torch.tensor([seen]),
        prompt_lengths=torch.tensor([seen]),
        capacity=torch.tensor([capacity]),
        token_ids=torch.zeros(1, seen, dtype=torch.long),
        group_size=1,
    )


def cache(n_keys: int, heads: int = 1) -> LayerCache:
    layer = LayerCache()
    layer.append(torch.randn(1, heads, n_keys, 4), torch.randn(1, heads, n_keys, 4), torch.arange(n_keys)[None])
    return layer


def vote_then_evict(policy, layer: LayerCache, votes: torch.Tensor, capacity: int) -> None:
    """Prefill eviction after one observed row: ``votes`` [1, H, T] is the last prompt query's attention."""
    n = votes.shape[-1]
    ctx = prefill_context(n, capacity)
    policy.observe(layer, votes[:, :, None, :], torch.full((1, 1), n - 1), ctx)
    policy.evict(layer, ctx)


def kept_positions(layer: LayerCache) -> list[int]:
    return layer.positions[0, 0][layer.valid[0, 0]].tolist()


def test_snapkv_pools_votes_over_the_prefix_only():
    # 10 keys, window 2 (keys 8, 9), kernel 3, capacity 4 = the window + 2 prefix keys. The window votes for
    # itself (0.9); pooled over all keys, that vote spills onto key 7 (its neighbour) and keeps it. Over the
    # prefix only, the two best prefix keys are the sink 0 and its pooled neighbour 1.
    votes = torch.tensor([0.5, 0.01, 0.01, 0.01, 0.3, 0.01, 0.01, 0.01, 0.9, 0.9])
    policy, layer, ctx = SnapKVPolicy(window=2, kernel=3, pooling="max"), cache(10), prefill_context(10, 4)
    policy.observe(layer, votes[None, None, None, :], torch.full((1, 1), 9), ctx)
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [0, 1, 8, 9]


def test_snapkv_avg_pooling_ignores_the_window_columns():
    # Window 1 (key 7), kernel 3, capacity 2. Pooled with the window's 0.9, key 6 would score 0.37 and be kept;
    # over the prefix only it scores 0.07 and the best prefix key is 1 ((0.02 + 0.01 + 0.3) / 3 = 0.11).
    votes = torch.tensor([0.02, 0.01, 0.3, 0.01, 0.01, 0.2, 0.01, 0.9])
    policy, layer, ctx = SnapKVPolicy(window=1, kernel=3, pooling="avg"), cache(8), prefill_context(8, 2)
    policy.observe(layer, votes[None, None, None, :], torch.full((1, 1), 7), ctx)
    scores = policy.score(layer, ctx)[0, 0]
    assert torch.allclose(scores[6], torch.tensor((0.2 + 0.01 + 0.0) / 3))  # key 7's 0.9 not pooled in
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [1, 7]


def capacities(policy: PyramidKVPolicy, capacity: int, n_layers: int, seen: int = 10_000) -> list[int]:
    return [
        int(policy.layer_capacity(torch.tensor([capacity]), prefill_context(seen, capacity, layer, n_layers))[0])
        for layer in range(n_layers)
    ]


def test_pyramidkv_shares_the_budget_minus_the_window_and_adds_the_window_back():
    # C = 232, window 32: the pyramid covers R = 200, from 2R - R/20 = 390 down to R/20 = 10 (step 95).
    assert capacities(PyramidKVPolicy(window=32, beta=20.0), 232, 5) == [422, 327, 232, 137, 42]


def test_pyramidkv_top_layer_keeps_at_least_its_window_and_the_mean_is_the_budget():
    policy = PyramidKVPolicy(window=32, beta=20.0)
    for capacity in (40, 100, 300):
        layers = capacities(policy, capacity, 30)
        assert min(layers) >= 32
        assert layers == sorted(layers, reverse=True)
        assert abs(sum(layers) / 30 - capacity) <= 1
    assert capacities(policy, 20, 4) == [20, 20, 20, 20]  # budget below the window: the last C tokens


def test_pyramidkv_top_layer_evicts_none_of_its_window():
    torch.manual_seed(0)
    policy, layer = PyramidKVPolicy(window=4, kernel=3), cache(40)
    ctx = prefill_context(40, 6, layer_idx=3, n_layers=4)  # top layer: window 4 + R/beta = 0.1 -> 4 entries
    policy.observe(layer, torch.rand(1, 1, 4, 40), torch.arange(36, 40)[None], ctx)
    policy.evict(layer, ctx)
    assert kept_positions(layer) == [36, 37, 38, 39]
