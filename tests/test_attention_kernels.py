"""The attention kernels: cheap exact masks for SDPA, and the flash-attn path (checked against a reference)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from kvbench.batching import collate
from kvbench.cache import EMPTY, LayerCache
from kvbench.engine import make_engine
from kvbench.engine.generate import generate
from kvbench.engine.kernels import attention, has_empty, sdpa_masking, visible
from kvbench.policies.base import Budget
from kvbench.policies.full import FullCache

HEADS, KV_HEADS, DIM = 6, 2, 16


def _layer(positions: list[list[int]], kv_heads: int = KV_HEADS) -> LayerCache:
    """A held layer for 2 examples whose slots have ``positions`` (per example, shared by the heads)."""
    generator = torch.Generator().manual_seed(0)
    held = torch.tensor(positions, dtype=torch.int32)[:, None, :].expand(2, kv_heads, -1).contiguous()
    shape = (2, kv_heads, held.shape[-1], DIM)
    return LayerCache(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator), held)


def _reference(query: torch.Tensor, layer: LayerCache, query_positions: torch.Tensor, group: int) -> torch.Tensor:
    mask = visible(layer.positions, query_positions, group)
    return F.scaled_dot_product_attention(query, layer.keys, layer.values, attn_mask=mask, enable_gqa=group > 1)


def _step(held: list[list[int]], q_len: int, group: int) -> tuple[torch.Tensor, LayerCache, torch.Tensor]:
    """A step of ``q_len`` new tokens after ``held`` slots, with the step's keys already appended."""
    start = 10 if held else 0
    step = torch.arange(start, start + q_len).expand(2, q_len)
    positions = [row + step[0].tolist() for row in held] if held else step.tolist()
    query = torch.randn(2, HEADS, q_len, DIM, generator=torch.Generator().manual_seed(1))
    return query, _layer(positions, HEADS // group), step


# (held positions per example before the step, step length, heads sharing a KV head)
CASES = {
    "decode after eviction": ([[0, 3, 7, 9], [1, 2, 8, 9]], 1, 3),
    "first chunk": ([], 5, 3),
    "later chunk, no GQA": ([[0, 3, 7, 9], [1, 2, 8, 9]], 3, 1),
    "later chunk, GQA": ([[0, 3, 7, 9], [1, 2, 8, 9]], 3, 3),
}


@pytest.mark.parametrize("case", CASES)
def test_cheap_masks_equal_the_boolean_mask(case):
    held, q_len, group = CASES[case]
    query, layer, step = _step(held, q_len, group)
    masking = sdpa_masking(layer, step, group, has_empty(layer, step))
    expected = {
        "decode after eviction": "none",
        "first chunk": "is_causal",
        "later chunk, no GQA": "CausalBias",
        "later chunk, GQA": "CausalBias",
    }[case]
    kind = "is_causal" if masking.get("is_causal") else type(masking.get("attn_mask", None)).__name__
    assert kind.replace("NoneType", "none") == expected
    out = attention(query, layer, step, DIM**-0.5, group, "sdpa")
    torch.testing.assert_close(out, _reference(query, layer, step, group), atol=1e-5, rtol=1e-5)


def test_empty_slots_or_padding_get_the_boolean_mask():
    layer = _layer([[0, 1, EMPTY, 3], [0, 1, 2, 3]])
    query = torch.randn(2, HEADS, 1, DIM)
    step = torch.tensor([[3], [3]])
    group = HEADS // KV_HEADS
    assert sdpa_masking(layer, step, group, has_empty(layer, step))["attn_mask"].dtype == torch.bool
    out = attention(query, layer, step, DIM**-0.5, group, "sdpa")
    torch.testing.assert_close(out, _reference(query, layer, step, group))
    padded_query = torch.tensor([[EMPTY], [3]])
    full = _layer([[0, 1, 2, 3], [0, 1, 2, 3]])
    assert sdpa_masking(full, padded_query, group, has_empty(full, padded_query))["attn_mask"].dtype == torch.bool


def _reference_flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's documented contract: [B, S, H, D] tensors, GQA by head groups, causal aligned lower-right."""
    assert dropout_p == 0.0 and causal
    group = q.shape[2] // k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s_q, s_k = q.shape[2], k.shape[2]
    allowed = torch.arange(s_k)[None, :] <= torch.arange(s_q)[:, None] + (s_k - s_q)
    logits = (q @ k.transpose(-1, -2)) * softmax_scale
    return torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).matmul(v).transpose(1, 2)


@pytest.fixture
def fake_flash_attn(monkeypatch) -> list[int]:
    """A stand-in ``flash_attn`` module (the references); counts ``flash_attn_func`` calls."""
    return _install_flash(monkeypatch, "flash_attn_func")


@pytest.mark.parametrize("case", CASES)
def test_flash_attention_2_layout_matches_sdpa(case, fake_flash_attn):
    held, q_len, group = CASES[case]
    query, layer, step = _step(held, q_len, group)
    out = attention(query, layer, step, DIM**-0.5, group, "flash_attention_2")
    assert fake_flash_attn == [1]
    torch.testing.assert_close(out, _reference(query, layer, step, group), atol=1e-5, rtol=1e-5)


def test_flash_attention_2_generation_equals_sdpa(tiny, fake_flash_attn):
    """Whole greedy generation on the tiny GQA model (one prompt, chunked prefill): identical tokens."""
    model, tokenizer = tiny
    ids = [[list(range(3, 200)), []]]
    tokens = {}
    for kernel in ("sdpa", "flash_attention_2"):
        engine = make_engine(model, FullCache(), Budget(), kernel=kernel)
        batch = collate(ids, tokenizer.pad_token_id or 0, "cpu")
        tokens[kernel] = generate(model, engine, batch, 12, set(), chunk_size=64).tokens
    assert fake_flash_attn and tokens["flash_attention_2"] == tokens["sdpa"]


def _reference_flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens, softmax_scale=None, causal=False):
    """flash-attn's documented contract: row b sees its first cache_seqlens[b] slots, causal lower-right
    (query i of s_q sees slot j when j <= i + cache_seqlens[b] - s_q); a query seeing nothing outputs zeros."""
    assert causal
    group = q.shape[2] // k_cache.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k_cache, v_cache))
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    s_q, slots = q.shape[2], torch.arange(k.shape[2])
    seqlens = cache_seqlens.long()[:, None, None]
    lower_right = slots[None, None, :] <= torch.arange(s_q)[None, :, None] + seqlens - s_q
    allowed = (slots[None, None, :] < seqlens) & lower_right
    logits = ((q @ k.transpose(-1, -2)) * softmax_scale).masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, -1))
    return probs.matmul(v).transpose(1, 2)


@pytest.fixture
def fake_flash_kvcache(monkeypatch) -> list[int]:
    """A stand-in ``flash_attn`` module (the references); counts ``flash_attn_with_kvcache`` calls."""
    return _install_flash(monkeypatch, "flash_attn_with_kvcache")


def _install_flash(monkeypatch, counted: str) -> list[int]:
    """Install a ``flash_attn`` module whose entry points are the references above; returns the list that each
    call of the ``counted`` entry point appends to."""
    calls = []
    references = {
        "flash_attn_func": _reference_flash_attn_func,
        "flash_attn_with_kvcache": _reference_flash_attn_with_kvcache,
    }

    def counting(*args, **kwargs):
        calls.append(1)
        return references[counted](*args, **kwargs)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(**{**references, counted: counting}))
    return calls


def test_flash_attention_2_with_empty_slots_uses_cache_seqlens(fake_flash_kvcache):
    """A left-padded chunk, then (after a per-head eviction: ragged heads) a decode step: the flash form over the
    cache's prefix layout equals the boolean-mask reference on every real query."""
    generator = torch.Generator().manual_seed(3)
    group = HEADS // KV_HEADS
    layer = LayerCache()
    positions = torch.tensor([[EMPTY, EMPTY, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    keys, values = (torch.randn(2, KV_HEADS, 6, DIM, generator=generator) for _ in range(2))
    layer.append(keys, values, positions)
    query = torch.randn(2, HEADS, 6, DIM, generator=generator)
    out = attention(query, layer, positions, DIM**-0.5, group, "flash_attention_2", empty=True)
    real = positions != EMPTY
    expected = _reference(query, layer, positions, group)
    torch.testing.assert_close(out.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
    keep = torch.rand(2, KV_HEADS, layer.length, generator=generator) < 0.6
    layer.keep(keep)
    assert not layer.heads_aligned
    step = torch.tensor([[4], [6]])
    layer.append(*(torch.randn(2, KV_HEADS, 1, DIM, generator=generator) for _ in range(2)), step, padded=False)
    query = torch.randn(2, HEADS, 1, DIM, generator=generator)
    out = attention(query, layer, step, DIM**-0.5, group, "flash_attention_2", empty=True)
    torch.testing.assert_close(out, _reference(query, layer, step, group), atol=1e-5, rtol=1e-5)
    assert fake_flash_kvcache == [1, 1]


@pytest.mark.parametrize("policy", ["full", "adakv"])
def test_flash_attention_2_padded_batch_generation_equals_sdpa(tiny, fake_flash_kvcache, policy):
    """A left-padded batch of two prompts (and AdaKV's ragged heads): the same tokens as SDPA's boolean masks."""
    from kvbench.policies import build

    model, tokenizer = tiny
    ids = [[list(range(3, 200)), []], [list(range(50, 170)), []]]
    budget = Budget() if policy == "full" else Budget("fraction", 0.3)
    tokens = {}
    for kernel in ("sdpa", "flash_attention_2"):
        engine = make_engine(model, build(policy), budget, kernel=kernel)
        batch = collate(ids, tokenizer.pad_token_id or 0, "cpu")
        tokens[kernel] = generate(model, engine, batch, 12, set(), chunk_size=64).tokens
    assert fake_flash_kvcache and tokens["flash_attention_2"] == tokens["sdpa"]
