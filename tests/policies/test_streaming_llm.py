"""StreamingLLM keeps its sinks and recent window; with ``position_shift`` each held key sits at its slot rank."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvbench.cache import EMPTY
from kvbench.policies.base import Budget, rotate
from kvbench.policies.streaming_llm import StreamingLLMPolicy

from .test_matrix import essay_ids, run


def _rope(model, keys, positions):
    """transformers' own RoPE of pre-RoPE keys [1, H, T, D] at ``positions`` [T]."""
    cos, sin = model.model.rotary_emb(keys, positions[None])
    return apply_rotary_pos_emb(keys, keys, cos, sin)[1]


def test_rotate_composes_with_transformers_rope(tiny):
    model, _ = tiny
    keys = torch.randn(1, 2, 5, model.config.head_dim)
    positions = torch.tensor([0, 3, 7, 20, 100])
    delta = torch.tensor([5, -3, 0, 11, -60])
    moved = rotate(_rope(model, keys, positions), delta.expand(1, 2, 5), model.model.rotary_emb.inv_freq)
    assert torch.allclose(moved, _rope(model, keys, positions + delta), atol=1e-5)


def test_sinks_and_recent_window_are_kept(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 1500)])
    _, engine = run(model, tokenizer, StreamingLLMPolicy(), Budget("tokens", 40), ids, 5)
    seen = int(engine.seen()[0])
    expected = list(range(4)) + list(range(seen - 36, seen))
    for layer in engine.cache.layers:
        assert sorted(layer.positions[0, 0].tolist()) == expected


def test_position_shift_keys_sit_at_their_slot_rank(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 1500)])
    tokens, engine = run(model, tokenizer, StreamingLLMPolicy(position_shift=True), Budget("tokens", 40), ids, 6)
    layer = engine.cache.layers[0]
    positions = layer.positions[0, 0]
    all_ids = torch.tensor(ids[0][0] + tokens[0])
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(all_ids[positions.long()]))
        pre_rope = attention.k_proj(hidden).view(1, -1, model.config.num_key_value_heads, model.config.head_dim)
    expected = _rope(model, pre_rope.transpose(1, 2), torch.arange(len(positions)))
    assert bool((positions != EMPTY).all()) and len(positions) == 40
    assert torch.allclose(layer.keys, expected, atol=1e-4)


def test_position_shift_without_eviction_equals_full(tiny, data_dir):
    model, tokenizer = tiny
    ids = essay_ids(data_dir, tokenizer, [(0, 900), (300, 500)])
    full, _ = run(model, tokenizer, StreamingLLMPolicy(), Budget("fraction", 1.0), ids, 8)
    shifted, _ = run(model, tokenizer, StreamingLLMPolicy(position_shift=True), Budget("fraction", 1.0), ids, 8)
    assert shifted == full
