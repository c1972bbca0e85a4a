"""DuoAttention: the retrieval/streaming split against a dense reference, the head score against one computed
by hand, and the pattern cache (safetensors + manifest, reused, recomputed when it does not match)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvbench.batching import collate
from kvbench.cache import EMPTY, LayerCache
from kvbench.calibration import duoattention as calibration
from kvbench.calibration import prepare
from kvbench.engine import make_engine
from kvbench.engine.generate import generate
from kvbench.errors import UserError
from kvbench.policies import build
from kvbench.policies.base import Budget, Context

from .test_matrix import Checked, essay_ids, run


def layer_of(lengths: list[int], heads: int, width: int) -> LayerCache:
    """A layer holding positions 0..n-1 of each example, left-padded to ``width`` slots (EMPTY)."""
    positions = torch.full((len(lengths), heads, width), EMPTY, dtype=torch.int32)
    for b, n in enumerate(lengths):
        positions[b, :, width - n :] = torch.arange(n, dtype=torch.int32)
    keys = torch.randn(len(lengths), heads, width, 4)
    return LayerCache(keys=keys, values=keys.clone(), positions=positions)


def context(seen: list[int], capacity: list[int], layer_idx: int, n_layers: int) -> Context:
    return Context(
        layer_idx=layer_idx,
        n_layers=n_layers,
        phase="prefill",
        seen=torch.tensor(seen),
        prompt_lengths=torch.tensor(seen),
        capacity=torch.tensor(capacity),
        token_ids=torch.zeros(len(seen), max(seen), dtype=torch.long),
        group_size=1,
        capacity_host=capacity,
        seen_host=seen,
    )


def dense_keep(scores, positions, seen, capacity, n_sink, recent):
    """The rule written out: the most retrieval heads r such that r heads of t entries and H - r streaming heads of
    min(t, n_sink + recent) fit in capacity x H (when none fits, the window shrinks to the capacity, sinks and
    recent in proportion); the r best-scored heads keep everything, the others their window."""
    heads = len(scores)
    keep = torch.zeros(positions.shape, dtype=torch.bool)
    for b, (t, c) in enumerate(zip(seen, capacity, strict=True)):
        window, sink, rec = min(t, n_sink + recent), n_sink, recent
        if c < window:
            sink = math.floor(c * n_sink / (n_sink + recent))
            window, rec = c, c - sink
        r = max(r for r in range(heads + 1) if r == 0 or r * t + (heads - r) * window <= c * heads)
        best = sorted(range(heads), key=lambda h: (-scores[h], h))[:r]
        for h in range(heads):
            for slot, p in enumerate(positions[b, h].tolist()):
                if p != EMPTY:
                    keep[b, h, slot] = h in best or p < sink or p >= t - rec
    return keep


@pytest.mark.parametrize(
    ("seen", "capacity"),
    [
        ([40, 25], [30, 20]),  # two and one retrieval heads of four
        ([40, 25], [16, 12]),  # none: every head streams
        ([40, 25], [6, 5]),  # the window shrinks to the capacity
        ([40, 25], [40, 25]),  # budget 1: all retrieval
        ([9, 7], [5, 4]),  # shorter than the window
    ],
)
def test_split_matches_the_dense_rule(seen, capacity):
    n_layers, heads = 2, 4
    scores = torch.tensor([[0.1, 0.9, 0.4, 0.4], [0.3, 0.2, 0.8, 0.5]])
    policy = build("duoattention", n_sink=2, recent=8, patterns=None)
    policy.use_patterns(scores, {})
    for layer_idx in range(n_layers):
        layer = layer_of(seen, heads, 44)
        positions = layer.positions.clone()
        ctx = context(seen, capacity, layer_idx, n_layers)
        expected = dense_keep(scores[layer_idx].tolist(), positions, seen, capacity, 2, 8)
        assert torch.equal(policy.select(layer, ctx), expected)
        policy.evict(layer, ctx)
        held = layer.held()
        assert bool((held.sum(-1) <= torch.tensor(capacity) * heads).all())
        assert layer.length == max(int(e.sum(-1).max()) for e in expected)


def test_the_head_score_matches_a_dense_reference():
    torch.manual_seed(0)
    heads, kv_heads, n, dim, rows, n_sink, recent = 4, 2, 30, 8, 5, 3, 6
    q, k, v = torch.randn(1, heads, n, dim), torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim)
    got = calibration.deviation(q, k, v, rows, n_sink, recent)
    expected = torch.zeros(kv_heads)
    for h in range(heads):
        g = h // (heads // kv_heads)
        full_rows, stream_rows = [], []
        for i in range(n - rows, n):
            logits = torch.tensor([float(q[0, h, i] @ k[0, g, j]) / math.sqrt(dim) for j in range(i + 1)])
            weights = logits.softmax(0)
            full_rows.append(weights @ v[0, g, : i + 1])
            kept = [j for j in range(i + 1) if j < n_sink or j > i - recent]
            stream = logits[kept].softmax(0)
            stream_rows.append(stream @ v[0, g, kept])
        full, streamed = torch.stack(full_rows), torch.stack(stream_rows)
        expected[g] += float((full - streamed).norm() / full.norm()) / (heads // kv_heads)
    assert torch.allclose(got, expected, atol=1e-5)


def test_patterns_are_cached_as_safetensors_with_a_manifest_and_reused(tiny, tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny
    settings = {"patterns": str(tmp_path), "calibration_prompts": 2, "calibration_tokens": 400}
    first = build("duoattention", **settings)
    prepare(first, model, tokenizer)
    (folder,) = [path.parent for path in tmp_path.rglob("manifest.json")]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "patterns.safetensors").is_file() and folder.name == manifest["key"]
    assert manifest["settings"]["tokens"] == 400 and manifest["settings"]["haystack"] == "passkey_filler"
    assert {"identity", "kvbench", "created"} <= set(manifest)
    assert first.scores.shape == (4, 2) and bool((first.scores > 0).all())

    def no_estimate(*args):
        raise AssertionError("recomputed")

    monkeypatch.setattr(calibration, "estimate", no_estimate)
    second = build("duoattention", **settings)
    prepare(second, model, tokenizer)
    assert torch.equal(second.scores, first.scores) and second.manifest["key"] == manifest["key"]

    manifest["settings"]["seed"] = 99  # a manifest for something else under this key: recomputed, with a note
    (folder / "manifest.json").write_text(json.dumps(manifest))
    calls = []
    monkeypatch.setattr(calibration, "estimate", lambda *args: calls.append(1) or first.scores + 1)
    third = build("duoattention", **settings)
    prepare(third, model, tokenizer)
    assert calls == [1] and torch.equal(third.scores, first.scores + 1)
    assert "do not match this run (settings); recomputing" in capsys.readouterr().out
    assert json.loads((folder / "manifest.json").read_text())["settings"]["seed"] == 0  # rewritten

    (folder / "patterns.safetensors").write_bytes(b"damaged")  # unreadable: recomputed, with a note
    fourth = build("duoattention", **settings)
    prepare(fourth, model, tokenizer)
    assert calls == [1, 1] and "cannot be read" in capsys.readouterr().out
    assert torch.equal(calibration.load(folder, fourth.manifest, model), first.scores + 1)  # rewritten

    other = build("duoattention", **{**settings, "recent": 128})  # other settings: their own folder
    prepare(other, model, tokenizer)
    assert len(list(tmp_path.rglob("manifest.json"))) == 2


def test_the_best_scored_heads_keep_everything_in_a_real_run(tiny, data_dir):
    model, tokenizer = tiny
    policy = build("duoattention", patterns=None, calibration_prompts=2, calibration_tokens=400)
    prepare(policy, model, tokenizer)
    ids = essay_ids(data_dir, tokenizer, [(0, 3000)])
    length = len(ids[0][0])
    engine = make_engine(model, policy, Budget("fraction", 0.8))
    generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 1, set(), chunk_size=64)
    capacity = math.floor(0.8 * length)  # one new token: no decode step
    window = min(capacity, 64 + 256)
    for index, layer in enumerate(engine.cache.layers):
        held = layer.held()[0]  # [Hkv]
        best = int(policy.scores[index].argmax())
        assert int(held[best]) == length and int(held[1 - best]) == window  # 1 retrieval head of 2
        assert int(held.sum()) <= 2 * capacity
        # the padded layout: a layer with a retrieval head holds full-length tensors
        assert layer.length == length


@pytest.mark.parametrize(("budget", "chunked"), [(0.6, False), (0.9, True), (0.2, False)])
def test_the_matrix_invariants_hold_with_retrieval_heads(budget, chunked, tiny, data_dir):
    """The matrix's checks (budget per layer, the window kept, no evicted key back) where heads do get retrieval
    status: a window of 4 + 28 tokens under prompts of about 100 and 220 tokens, 6 decode steps."""
    model, tokenizer = tiny
    policy = build("duoattention", n_sink=4, recent=28, patterns=None, calibration_prompts=2, calibration_tokens=256)
    checked = Checked("duoattention", policy, Budget("fraction", budget))
    ids = essay_ids(data_dir, tokenizer, [(0, 900), (97, 400)])
    budgeted = Budget("fraction", budget)
    _, engine = run(model, tokenizer, policy, budgeted, ids, 6, chunk_size=48, evict_per_chunk=chunked)
    assert checked.evictions > 0
    retrieval = [int((layer.held()[0] > 32).sum()) for layer in engine.cache.layers]
    assert (retrieval == [0] * 4) if budget < 0.5 else all(r >= 1 for r in retrieval), retrieval


def test_patterns_of_another_model_are_refused(tiny, data_dir):
    model, tokenizer = tiny
    policy = build("duoattention", patterns=None)
    policy.use_patterns(torch.rand(3, 2), {})
    ids = essay_ids(data_dir, tokenizer, [(0, 3000)])
    engine = make_engine(model, policy, Budget("fraction", 0.3))
    with pytest.raises(UserError, match="another model"):
        generate(model, engine, collate(ids, tokenizer.pad_token_id, "cpu"), 1, set(), chunk_size=64)


def test_without_patterns_the_policy_says_how_to_get_them():
    layer = layer_of([10], 2, 10)
    with pytest.raises(UserError, match="kvbench.calibration.prepare"):
        build("duoattention", patterns=None).select(layer, context([10], [3], 0, 1))
