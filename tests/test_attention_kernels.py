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
    """Install a ``flash_attn`` module whose ``flash_attn_func`` is the reference above; counts its calls."""
    calls = []

    def flash_attn_func(*args, **kwargs):
        calls.append(1)
        return _reference_flash_attn_func(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=flash_attn_func))
    return calls


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


def test_flash_attention_2_falls_back_to_sdpa_on_empty_slots(fake_flash_attn):
    layer = _layer([[0, 1, EMPTY, 3], [0, 1, 2, 3]])
    query, step, group = torch.randn(2, HEADS, 1, DIM), torch.tensor([[3], [3]]), HEADS // KV_HEADS
    out = attention(query, layer, step, DIM**-0.5, group, "flash_attention_2")
    assert fake_flash_attn == []
    torch.testing.assert_close(out, _reference(query, layer, step, group))
