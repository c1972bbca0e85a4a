"""Fixed capacity (after BCT): never above m, and each update rule does what it says."""

from __future__ import annotations

import pytest
import torch

from kvbench.batching import collate
from kvbench.cache import LayerCache
from kvbench.engine.engine import Engine
from kvbench.engine.generate import generate
from kvbench.policies.base import Budget
from kvbench.policies.fixed_capacity import RULES, FixedCapacityPolicy

from .hand import context


def cache(keys: torch.Tensor, values: torch.Tensor | None = None) -> LayerCache:
    """One example, one KV head: keys [T, D]."""
    layer = LayerCache()
    values = torch.randn_like(keys) if values is None else values
    layer.append(keys[None, None], values[None, None], torch.arange(keys.shape[0])[None])
    return layer


def kept_positions(layer: LayerCache) -> list[int]:
    return layer.positions[0, 0][layer.valid[0, 0]].tolist()


def test_sliding_window_keeps_sinks_and_the_most_recent():
    layer = cache(torch.randn(10, 4))
    FixedCapacityPolicy(rule="sliding_window", n_sink=2).evict(layer, context(10, 5))
    assert kept_positions(layer) == [0, 1, 7, 8, 9]


def test_replace_lowest_replaces_the_lowest_accumulated_score_and_admits_the_newest():
    layer = cache(torch.randn(6, 4))
    layer.stat("fixed_capacity")[0, 0] = torch.tensor([0.9, 0.3, 0.1, 0.5, 0.4, 0.0])  # newest has no history yet
    FixedCapacityPolicy(rule="replace_lowest").evict(layer, context(6, 5))
    assert kept_positions(layer) == [0, 1, 3, 4, 5]


def test_merge_folds_the_evicted_pair_into_its_most_similar_kept_slot():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.2], [0.0, -1.0]])
    values = torch.arange(10.0).reshape(5, 2)
    layer = cache(keys.clone(), values.clone())
    layer.stat("fixed_capacity")[0, 0] = torch.tensor([3.0, 2.0, 1.0, 2.5, 0.5])  # slot 2 is the lowest
    FixedCapacityPolicy(rule="merge").evict(layer, context(5, 4))
    assert kept_positions(layer) == [0, 1, 3, 4] and layer.keys.shape[2] == 4
    # Slot 2's key is closest to slot 0's: slot 0 becomes (3 * slot0 + 1 * slot2) / 4, the others are unchanged.
    assert torch.allclose(layer.values[0, 0, 0], (3 * values[0] + values[2]) / 4, atol=1e-5)
    assert torch.allclose(layer.keys[0, 0, 0], (3 * keys[0] + keys[2]) / 4, atol=1e-5)
    assert torch.equal(layer.values[0, 0, 1:], values[[1, 3, 4]])
    assert torch.allclose(layer.stat("fixed_capacity")[0, 0], torch.tensor([4.0, 2.0, 2.5, 0.5]))


@pytest.mark.parametrize("rule", RULES)
def test_never_above_m_through_the_model(rule, tiny, data_dir):
    model, tokenizer = tiny
    m = 24
    policy = FixedCapacityPolicy(rule=rule)
    held = []
    original = policy.evict

    def evict(layer, ctx):
        original(layer, ctx)
        held.append(int(layer.held().max()))

    policy.evict = evict
    text = (data_dir / "haystack" / "PaulGrahamEssays" / "worked.txt").read_text()
    ids = [[tokenizer.encode(text[a : a + n], add_special_tokens=False), []] for a, n in [(0, 400), (300, 250)]]
    config = model.config
    engine = Engine(policy, Budget("tokens", m), config.num_hidden_layers, 2)
    generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 6, set(), chunk_size=32, evict_per_chunk=True)
    assert held and max(held) == m
    assert bool((engine.cache.held() == m).all())
