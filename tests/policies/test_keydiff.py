"""KeyDiff against a dense reference: the kept keys are the least cosine-similar to the mean normalised key,
per head, padding excluded; and no attention row is ever computed for it."""

from __future__ import annotations

import torch

import kvbench.engine.engine
from kvbench.cache import EMPTY, LayerCache
from kvbench.policies.base import Budget, Needs
from kvbench.policies.keydiff import KeyDiffPolicy

from .hand import context
from .test_matrix import essay_ids, run


def test_keydiff_keeps_the_keys_least_like_the_mean_key():
    torch.manual_seed(0)
    keys = torch.randn(1, 2, 12, 8)
    positions = torch.arange(12)[None].clone()
    positions[0, :2] = EMPTY  # two padding slots: outside the anchor and never kept
    layer = LayerCache()
    layer.append(keys, torch.randn(1, 2, 12, 8), positions)
    KeyDiffPolicy().evict(layer, context(seen=10, capacity=4))
    for head in range(2):
        real = keys[0, head, 2:]  # [10, D]
        unit = real / real.norm(dim=-1, keepdim=True)
        anchor = unit.mean(0)
        cosine = (real @ anchor) / (real.norm(dim=-1) * anchor.norm())
        expected = sorted((torch.argsort(cosine)[:4] + 2).tolist())  # lowest similarity first
        assert sorted(layer.positions[0, head][layer.valid[0, head]].tolist()) == expected


def test_keydiff_needs_no_attention_rows(tiny, data_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("keydiff asked for attention rows")

    monkeypatch.setattr(kvbench.engine.engine, "attention_probs", forbidden)
    assert KeyDiffPolicy().needed() == Needs()  # no rows, no queries
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 800)])
    _, engine = run(model, tokenizer, KeyDiffPolicy(), Budget("fraction", 0.3), ids, 4)
    assert int(engine.cache.held().max()) <= int(0.3 * (len(ids[0][0]) + 4))
