"""FastGen: profiling picks the first set that reaches T, its streamed recovery equals the dense one, T = 1 is
the full cache, and decode keeps each head to its set."""

from __future__ import annotations

import math

import pytest
import torch

from kvbench.cache import EMPTY, LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import Budget, Context
from kvbench.policies.fastgen import CHOICES, FREQUENT, FULL, LOCAL, PUNCT, SPECIAL, FastGenPolicy
from kvbench.policies.full import FullCache

from .test_matrix import essay_ids, run

SPECIAL_ID, PUNCT_ID = 0, 1
N = 40  # prompt length: window and frequent set of floor(0.3 * 40) = 12 tokens
PUNCT_AT = (1, 7, 13, 19, 25, 31, 37)
HEAVY_AT = (2, 3)


def policy(recovery: float = 0.95) -> FastGenPolicy:
    return FastGenPolicy(recovery=recovery, special_ids=[SPECIAL_ID], punct_ids=[PUNCT_ID])


def prompt_ids(n: int = N) -> torch.Tensor:
    """Token ids by position: a special token first, punctuation at PUNCT_AT, ordinary ids elsewhere."""
    ids = torch.arange(n) + 100
    ids[0] = SPECIAL_ID
    ids[list(p for p in PUNCT_AT if p < n)] = PUNCT_ID
    return ids


def structured_rows(special=0.0, punct=0.0, heavy=0.0, diagonal=0.0, n: int = N) -> torch.Tensor:
    """Causal rows [n, n]: the given mass on the special token, the punctuation, the heavy hitters and the
    query itself; the rest spread evenly. Mass with nowhere to go yet (early rows) goes to the special token."""
    rows = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        rest = 1.0 - special - punct - heavy - diagonal
        rows[i, : i + 1] = rest / (i + 1)
        rows[i, 0] += special
        rows[i, i] += diagonal
        for mass, where in ((punct, PUNCT_AT), (heavy, HEAVY_AT)):
            seen = [p for p in where if p <= i]
            if seen:
                rows[i, seen] += mass / len(seen)
            else:
                rows[i, 0] += mass
    return rows


def dense_recovery(rows: torch.Tensor, ids: torch.Tensor, special, punct, r_l=0.3, r_f=0.3) -> torch.Tensor:
    """Reference: build every set's [n, n] keep mask and average the retained mass over the rows."""
    n = rows.shape[0]
    frequent = torch.zeros(n, dtype=torch.bool)
    frequent[rows.sum(0).argsort(descending=True, stable=True)[: math.floor(r_f * n + 1e-9)]] = True
    is_special, is_punct = torch.isin(ids, torch.tensor(special)), torch.isin(ids, torch.tensor(punct))
    distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    local = (distance >= 0) & (distance < max(1, math.floor(r_l * n + 1e-9)))
    static = is_special | is_punct | frequent
    masks = [is_special, is_special | is_punct, static, static[None, :] | local, torch.ones(n, dtype=torch.bool)]
    return torch.stack([(rows * mask.expand(n, n)).sum(1).mean() for mask in masks])


def prefill_head(fastgen: FastGenPolicy, rows: torch.Tensor, ids: torch.Tensor, group_size: int = 1, block: int = 7):
    """Stream hand-built rows [B, H, n, n] (left-padded; padding rows and columns are zero) through observe in
    blocks, then evict at the end of prefill. ``ids`` [B, n] by column; returns (layer, ctx).

    The cache holds a row's tokens in its first slots (padding after them), so the key columns are moved to
    those slots."""
    batch, heads, n, _ = rows.shape
    lengths = (ids >= 0).sum(-1)
    rows = torch.stack([rows[b].roll(int(length) - n, dims=-1) for b, length in enumerate(lengths)])
    positions = torch.arange(n)[None, :] - (n - lengths)[:, None]
    positions = positions.masked_fill(positions < 0, EMPTY)
    token_ids = torch.full((batch, n + 64), -1, dtype=torch.long)  # room for decode steps
    for b in range(batch):
        token_ids[b, : int(lengths[b])] = ids[b, n - int(lengths[b]) :]
    layer = LayerCache()
    hkv = heads // group_size
    layer.append(torch.zeros(batch, hkv, n, 1), torch.zeros(batch, hkv, n, 1), positions)
    ctx = Context(
        layer_idx=0,
        n_layers=1,
        phase="prefill",
        seen=lengths.clone(),
        prompt_lengths=lengths.clone(),
        capacity=None,
        token_ids=token_ids,
        group_size=group_size,
    )
    for start in range(0, n, block):
        part = slice(start, start + block)
        fastgen.observe(layer, rows[:, :, part].float(), positions[:, part], ctx)
    fastgen.evict(layer, ctx)
    return layer, ctx


def one_head(fastgen: FastGenPolicy, rows: torch.Tensor):
    return prefill_head(fastgen, rows[None, None], prompt_ids()[None])


CASES = {
    "special": dict(special=0.97),
    "special+punct": dict(special=0.6, punct=0.38),
    "special+punct+frequent": dict(special=0.3, punct=0.2, heavy=0.48),
    "special+punct+frequent+local": dict(special=0.3, punct=0.1, heavy=0.1, diagonal=0.48),
    "full": dict(),
}


@pytest.mark.parametrize("expected", CASES)
def test_profiling_picks_the_first_set_that_reaches_t(expected):
    rows = structured_rows(**CASES[expected])
    reference = dense_recovery(rows, prompt_ids(), [SPECIAL_ID], [PUNCT_ID])
    assert CHOICES[int((reference >= 0.95).to(torch.int8).argmax())] == expected  # the case is what it says
    layer, _ = one_head(policy(0.95), rows)
    assert CHOICES[int(layer.extra["fastgen_choice"][0, 0])] == expected
    assert torch.allclose(layer.extra["fastgen_recovery"][0, 0].double(), reference, atol=1e-5)


def test_lower_t_picks_a_cheaper_set():
    rows = structured_rows(special=0.6, punct=0.38)
    layer, _ = one_head(policy(0.55), rows)
    assert int(layer.extra["fastgen_choice"][0, 0]) == SPECIAL


@pytest.mark.parametrize("seed", range(3))
def test_streamed_recovery_equals_dense_reference_with_gqa_and_padding(seed):
    generator = torch.Generator().manual_seed(seed)
    n, group, hkv, lengths = 33, 2, 2, (33, 21)
    ids = torch.randint(100, 200, (2, n), generator=generator)
    ids[torch.rand(2, n, generator=generator) < 0.15] = PUNCT_ID
    ids[torch.rand(2, n, generator=generator) < 0.05] = SPECIAL_ID
    rows = torch.zeros(2, group * hkv, n, n, dtype=torch.float64)
    for b, length in enumerate(lengths):
        ids[b, : n - length] = -1
        logits = torch.randn(group * hkv, length, length, generator=generator, dtype=torch.float64) * 3
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        rows[b, :, n - length :, n - length :] = logits.masked_fill(~causal, -math.inf).softmax(-1)
    layer, _ = prefill_head(policy(0.95), rows, ids, group_size=group)
    for b, length in enumerate(lengths):
        for h in range(hkv):
            averaged = rows[b, h * group : (h + 1) * group, n - length :, n - length :].mean(0)
            reference = dense_recovery(averaged, ids[b, n - length :], [SPECIAL_ID], [PUNCT_ID])
            assert torch.allclose(layer.extra["fastgen_recovery"][b, h].double(), reference, atol=1e-5)


def test_prefill_keeps_what_the_chosen_set_keeps_for_the_last_row():
    rows = structured_rows(special=0.3, punct=0.1, heavy=0.1, diagonal=0.48)
    layer, _ = one_head(policy(0.95), rows)
    assert int(layer.extra["fastgen_choice"][0, 0]) == LOCAL
    frequent = set(rows.sum(0).argsort(descending=True, stable=True)[:12].tolist())
    expected = {0, *PUNCT_AT} | frequent | set(range(N - 12, N))
    assert set(layer.positions[0, 0].tolist()) == expected


def test_t_of_one_keeps_every_head_full_without_token_lists():
    layer, _ = one_head(FastGenPolicy(recovery=1.0), structured_rows(special=1.0))
    assert int(layer.extra["fastgen_choice"][0, 0]) == FULL and layer.held().item() == N


def test_an_unbound_policy_says_so():
    with pytest.raises(UserError, match="bind"):
        one_head(FastGenPolicy(), structured_rows(special=1.0))


def decode(fastgen, layer, ctx, token_id: int, row: torch.Tensor | None = None):
    """One decode step on a hand-built layer: append a token, observe its row (``row`` over held slots by
    position, else uniform), evict. Returns the new token's position."""
    position = int(ctx.seen[0])
    ctx.token_ids[0, position] = token_id
    layer.append(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.tensor([[position]]))
    ctx.phase, ctx.seen = "decode", ctx.seen + 1
    held = layer.positions[0, 0]
    valid = held != EMPTY
    weights = torch.ones(held.shape) if row is None else row[held.clamp(max=len(row) - 1).long()]
    weights = torch.where(valid, weights, 0.0)
    fastgen.observe(layer, (weights / weights.sum())[None, None, None], torch.tensor([[position]]), ctx)
    fastgen.evict(layer, ctx)
    return position


def held(layer) -> set[int]:
    return {p for p in layer.positions[0, 0].tolist() if p != EMPTY}


def test_special_punct_head_drops_a_generated_ordinary_token():
    fastgen = policy(0.95)
    layer, ctx = one_head(fastgen, structured_rows(special=0.6, punct=0.38))
    assert int(layer.extra["fastgen_choice"][0, 0]) == PUNCT
    assert held(layer) == {0, *PUNCT_AT}
    ordinary = decode(fastgen, layer, ctx, 500)
    punct = decode(fastgen, layer, ctx, PUNCT_ID)
    special = decode(fastgen, layer, ctx, SPECIAL_ID)
    assert ordinary not in held(layer) and {punct, special} <= held(layer)
    assert held(layer) == {0, *PUNCT_AT, punct, special}


def test_local_head_drops_tokens_that_leave_the_window():
    fastgen = policy(0.95)
    layer, ctx = one_head(fastgen, structured_rows(special=0.3, punct=0.1, heavy=0.1, diagonal=0.48))
    assert int(layer.extra["fastgen_choice"][0, 0]) == LOCAL
    row = torch.zeros(200)
    row[0] = 1.0  # decode attends to the special token only: no ordinary token gains score
    dropped = set()
    for step in range(20):
        before = held(layer)
        new = decode(fastgen, layer, ctx, 500 + step, row)
        t = int(ctx.seen[0])
        window, k = math.floor(0.3 * t), math.floor(0.3 * t)
        now = held(layer)
        dropped |= (before | {new}) - now
        assert set(range(t - window, t)) <= now  # the window is kept
        old = {p for p in now if p < t - window and int(ctx.token_ids[0, p]) not in (SPECIAL_ID, PUNCT_ID)}
        assert len(old) <= k  # only the frequent set survives outside the window
    assert N - 12 in dropped and not dropped & {0, *PUNCT_AT}


def test_frequent_head_keeps_its_budget():
    fastgen = policy(0.95)
    layer, ctx = one_head(fastgen, structured_rows(special=0.3, punct=0.2, heavy=0.48))
    assert int(layer.extra["fastgen_choice"][0, 0]) == FREQUENT
    generator = torch.Generator().manual_seed(0)
    for step in range(25):
        new = decode(fastgen, layer, ctx, 500 + step, torch.rand(200, generator=generator))
        t = int(ctx.seen[0])
        now = held(layer)
        assert new in now  # the newest token stays for one step
        ordinary = {p for p in now if int(ctx.token_ids[0, p]) not in (SPECIAL_ID, PUNCT_ID) and p != new}
        assert len(ordinary) <= math.floor(0.3 * t)
        assert {0, *PUNCT_AT} <= now
    assert len(held(layer)) < int(ctx.seen[0])


def test_bind_reads_special_and_punctuation_ids_from_the_tokenizer(tiny):
    _, tokenizer = tiny
    fastgen = FastGenPolicy()
    fastgen.bind(tokenizer)
    special = {tokenizer.decode([i]) for i in fastgen.special_ids}
    assert {"<|im_start|>", "<|im_end|>", "user", "system"} <= special
    punct = {tokenizer.decode([i]) for i in fastgen.punct_ids}
    assert {".", ",", "?", ":", " (", "—"} <= punct and not {"\n", " the", "a", " "} & punct
    assert fastgen.params()["n_punct_ids"] == len(fastgen.punct_ids)


def bound(tokenizer, recovery: float) -> FastGenPolicy:
    fastgen = FastGenPolicy(recovery=recovery)
    fastgen.bind(tokenizer)
    return fastgen


def test_t_of_one_reproduces_the_full_cache_on_tiny(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 2000), (700, 900)])
    full, _ = run(model, tokenizer, FullCache(), Budget(), ids, 12)
    tokens, engine = run(model, tokenizer, bound(tokenizer, 1.0), Budget(), ids, 12)
    assert tokens == full
    assert torch.allclose(engine.meters.kept_fraction(), torch.ones(2, dtype=torch.float64))


def test_t_of_one_reproduces_the_full_cache_on_smollm2(smollm2, data_dir):
    model, tokenizer = smollm2
    ids = essay_ids(data_dir, tokenizer, [(0, 3000)])
    full, _ = run(model, tokenizer, FullCache(), Budget(), ids, 10, chunk_size=512)
    tokens, _ = run(model, tokenizer, bound(tokenizer, 1.0), Budget(), ids, 10, chunk_size=512)
    assert tokens == full


def test_a_real_run_compresses_and_reports_its_choices(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 1500), (300, 600)])
    fastgen = bound(tokenizer, 0.9)
    _, engine = run(model, tokenizer, fastgen, Budget(), ids, 4, chunk_size=128)
    report = fastgen.diagnostics(engine.cache)
    assert bool((engine.meters.kept_fraction() < 1).all())
    assert len(report) == 2  # one per example
    assert all(sum(r["fastgen_choice_counts"].values()) == 4 * 2 for r in report)  # layers x KV heads
    assert all(x >= 0.9 - 1e-6 for r in report for heads in r["fastgen_recovery"] for x in heads)
    for row, r in enumerate(report):  # each example's own choices, [layer][KV head]
        choice = [
            [CHOICES[int(layer.extra["fastgen_choice"][row, h])] for h in range(2)] for layer in engine.cache.layers
        ]
        assert r["fastgen_choice"] == choice
