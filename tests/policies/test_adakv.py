"""Ada-KV against a dense reference: window and safeguard per head, then one top-k across the layer's heads;
the layer's total stays capacity x Hkv while the heads keep different counts, and evicted entries are freed."""

from __future__ import annotations

import torch

from kvbench.labels import display_name
from kvbench.policies.adakv import AdaKVPolicy

from .test_snapkv_pyramidkv import cache, vote_then_evict


def test_adakv_shares_the_layer_budget_by_score_across_heads():
    torch.manual_seed(1)
    n, heads, window, capacity, alpha = 14, 3, 2, 5, 0.4
    votes = torch.rand(1, heads, n) * torch.tensor([3.0, 1.0, 0.2])[None, :, None]  # very uneven heads
    layer = cache(n, heads)
    policy = AdaKVPolicy(scorer="snapkv", scorer_params={"window": window, "kernel": 1}, alpha=alpha)
    vote_then_evict(policy, layer, votes, capacity)
    # Dense reference. SnapKV scores the prefix by its votes (window columns score 0 but are protected).
    prefix = votes[0, :, : n - window]
    guard = int(capacity * alpha)  # 2 per head
    kept = {h: {n - 2, n - 1} | set(torch.argsort(prefix[h], descending=True)[:guard].tolist()) for h in range(3)}
    rest = sorted(
        ((float(prefix[h, p]), h, p) for h in range(heads) for p in range(n - window) if p not in kept[h]),
        key=lambda item: -item[0],
    )
    for _, h, p in rest[: capacity * heads - sum(map(len, kept.values()))]:
        kept[h].add(p)
    for head in range(heads):
        assert set(layer.positions[0, head][layer.valid[0, head]].tolist()) == kept[head]
    counts = layer.held()[0].tolist()
    assert sum(counts) == capacity * heads and counts[0] > capacity > counts[2] >= window + guard
    assert layer.length == max(counts)  # evicted slots are cut, up to the longest head


def test_adakv_alpha_one_is_the_scorers_uniform_top_k():
    votes = torch.rand(1, 2, 10, generator=torch.Generator().manual_seed(2))
    layer = cache(10, heads=2)
    vote_then_evict(AdaKVPolicy(scorer_params={"window": 1, "kernel": 1}, alpha=1.0), layer, votes, 4)
    assert layer.held()[0].tolist() == [4, 4]  # the whole budget is the safeguard: every head keeps 4


def test_wrappers_are_labelled_as_kvbench_extensions_off_their_papers_scorer():
    assert display_name("adakv", {"scorer": "snapkv"}, True) == "adakv"
    assert display_name("adakv", {"scorer": "pyramidkv"}, True) == "adakv"
    assert display_name("adakv", {"scorer": "h2o"}, True) == "adakv (h2o, kvbench)"
    assert display_name("chunkkv", {"scorer": "knorm"}, True) == "chunkkv (knorm, kvbench)"
