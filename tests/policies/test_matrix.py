"""Every policy: budget 1.0 is the full cache; under any budget the cache stays within it, keeps what the
policy promises, never brings back an evicted key, and really frees the memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvbench.batching import collate
from kvbench.cache import EMPTY
from kvbench.calibration import prepare
from kvbench.engine import make_engine
from kvbench.engine.generate import generate
from kvbench.policies import CONFIGS, build
from kvbench.policies.base import Budget
from kvbench.policies.full import FullCache

from .cases import (
    DEFAULT_SIDE_STATE,
    ELSEWHERE,
    FULL_EQUIVALENT,
    LAYER_BUDGET,
    PARAMS,
    POLICIES,
    RAGGED,
    SIDE_STATE,
    UNDERFILL,
)


def make_policy(name: str, **overrides):
    return build(name, **{**PARAMS.get(name, {}), **overrides})


def essay_ids(data_dir, tokenizer, offsets_and_sizes):
    essay = (data_dir / "haystack" / "PaulGrahamEssays" / "worked.txt").read_text()
    return [[tokenizer.encode(essay[a : a + n], add_special_tokens=False), []] for a, n in offsets_and_sizes]


def run(model, tokenizer, policy, budget, ids, max_new_tokens, chunk_size=64, evict_per_chunk=False):
    policy.bind(tokenizer)
    prepare(policy, model, tokenizer, store=False)
    engine = make_engine(model, policy, budget)
    batch = collate(ids, tokenizer.pad_token_id, "cpu")
    out = generate(model, engine, batch, max_new_tokens, set(), chunk_size=chunk_size, evict_per_chunk=evict_per_chunk)
    return out.tokens, engine


def test_every_policy_config_has_a_matrix_line():
    """A new ``configs/policy/<name>.yaml`` needs its line in ``cases.py`` (or a reason it is tested elsewhere)."""
    configs = {path.stem for path in CONFIGS.glob("*.yaml")}
    covered = {*POLICIES, *FULL_EQUIVALENT, *ELSEWHERE}
    assert configs - covered == set(), f"add a line to tests/policies/cases.py for {sorted(configs - covered)}"
    assert covered - configs == set(), f"matrix lines without a config: {sorted(covered - configs)}"


@pytest.mark.parametrize("name", sorted({*POLICIES, *FULL_EQUIVALENT}))
def test_budget_one_reproduces_full_cache_on_tiny(name, tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 2000), (700, 900)])
    full, _ = run(model, tokenizer, FullCache(), Budget(), ids, 12)
    policy = make_policy(name, **FULL_EQUIVALENT.get(name, {}))
    tokens, engine = run(model, tokenizer, policy, Budget("fraction", 1.0), ids, 12)
    assert tokens == full
    assert torch.allclose(engine.meters.kept_fraction(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted({*POLICIES, *FULL_EQUIVALENT}))
def test_budget_one_reproduces_full_cache_on_smollm2(name, smollm2, data_dir):
    model, tokenizer = smollm2
    ids = essay_ids(data_dir, tokenizer, [(0, 3000)])
    full, _ = run(model, tokenizer, FullCache(), Budget(), ids, 10, chunk_size=512)
    policy = make_policy(name, **FULL_EQUIVALENT.get(name, {}))
    tokens, _ = run(model, tokenizer, policy, Budget("fraction", 1.0), ids, 10, chunk_size=512)
    assert tokens == full


class Checked:
    """Wraps a policy's ``evict`` to check the budget, the promised tokens and that evictions are final."""

    def __init__(self, name: str, policy, budget: Budget):
        self.name, self.policy, self.budget = name, policy, budget
        self.evicted: dict[int, set] = {}
        self.evictions = 0
        self.original = policy.evict
        policy.evict = self.evict

    def evict(self, layer, ctx):
        before = layer.positions.clone()
        self.original(layer, ctx)
        self.evictions += int((layer.positions != EMPTY).sum() < (before != EMPTY).sum())
        held = layer.held()
        capacity = self.budget.capacity(ctx.seen)
        if self.policy.needed().phase == "prefill" and ctx.phase == "decode":
            return
        limit = self.policy.layer_capacity(capacity, ctx) if hasattr(self.policy, "layer_capacity") else capacity
        if self.name in LAYER_BUDGET:  # head-adaptive: the layer's heads share capacity x Hkv
            assert bool((held.sum(-1) <= limit * held.shape[1]).all()), (self.name, held, limit)
        else:
            assert bool((held <= limit[:, None]).all()), (self.name, held, limit)
        promise = POLICIES[self.name]
        if promise is not None:
            must_keep = promise(self.policy, before, ctx.seen, capacity) & (before != EMPTY)
            for b, h, slot in must_keep.nonzero().tolist():
                assert int(before[b, h, slot]) in set(layer.positions[b, h].tolist()), (self.name, "protected")
        seen = self.evicted.setdefault(ctx.layer_idx, set())
        now = {(b, h, p) for b, h, p in _triples(layer.positions)}
        assert not (now & seen), (self.name, "an evicted key came back")
        seen |= {(b, h, p) for b, h, p in _triples(before)} - now


def _triples(positions):
    b, h, t = (positions != EMPTY).nonzero(as_tuple=True)
    return zip(b.tolist(), h.tolist(), positions[b, h, t].tolist(), strict=True)


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    budget=st.floats(min_value=0.05, max_value=0.9),
    sizes=st.lists(st.integers(min_value=150, max_value=900), min_size=1, max_size=2),
    new_tokens=st.integers(min_value=1, max_value=6),
    chunked=st.booleans(),
)
def test_policy_invariants_under_any_budget(name, budget, sizes, new_tokens, chunked, tiny, data_dir):
    model, tokenizer = tiny
    policy = make_policy(name)
    checked = Checked(name, policy, Budget("fraction", budget))
    ids = essay_ids(data_dir, tokenizer, [(97 * i, n) for i, n in enumerate(sizes)])
    run(model, tokenizer, policy, Budget("fraction", budget), ids, new_tokens, chunk_size=48, evict_per_chunk=chunked)
    assert checked.evictions > 0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_example_is_compressed_and_memory_is_freed(name, tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 3000), (500, 1800), (900, 2400)])
    lengths = torch.tensor([len(i[0]) for i in ids])
    _, full = run(model, tokenizer, FullCache(), Budget(), ids[:1], 1)
    _, engine = run(model, tokenizer, make_policy(name), Budget("fraction", 0.3), ids, 1)
    held = engine.cache.held().float().mean(dim=(0, 2))  # [B] mean over layers and heads
    assert bool((held <= torch.floor(0.3 * lengths) + 1e-6).all()) and bool((held >= 0.25 * lengths).all())
    _, single = run(model, tokenizer, make_policy(name), Budget("fraction", 0.3), ids[:1], 1)
    kv = sum(layer.kv_nbytes() for layer in single.cache.layers)
    full_kv = sum(layer.kv_nbytes() for layer in full.cache.layers)
    # Ragged heads are padded to the layer's longest head, and the bytes count it: the kept fraction the
    # bytes can show is that of the longest heads (all heads equal: the budget itself).
    longest = sum(float(layer.held().amax()) * layer.held().shape[1] for layer in single.cache.layers)
    entries = sum(float(layer.held().sum()) for layer in single.cache.layers)
    padded = longest / (len(single.cache.layers) * single.cache.layers[0].held().shape[1] * int(lengths[0]))
    assert abs(kv / full_kv - padded) <= 1e-6 + 1 / int(lengths[0])  # the allocation is exactly that, no more
    if name in RAGGED:
        assert entries / longest < 1.0 and kv / full_kv < 0.3 * single.cache.layers[0].held().shape[1]
    else:
        unused = UNDERFILL.get(name, lambda policy: 0)(make_policy(name)) / int(lengths[0])
        assert -unused - 0.02 * 0.3 - 1 / int(lengths[0]) <= kv / full_kv - 0.3 <= 0.02 * 0.3 + 1 / int(lengths[0])
    side = sum(layer.side_nbytes() for layer in single.cache.layers)
    assert side <= SIDE_STATE.get(name, DEFAULT_SIDE_STATE) * kv  # documented in cases.py and docs/engine.md
