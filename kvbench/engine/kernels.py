"""Attention kernels over a ``LayerCache``: masks, the SDPA / flash-attn calls, and the attention rows policies
observe. Below the policies (they may import it); it imports nothing of kvbench but the cache.

``attention`` (``attention=`` in the config): ``sdpa`` (default) gives SDPA the cheapest exact mask. When no slot
and no query is empty, the visible keys of query i of a q-token step over T slots are exactly slots 0..T-q+i
(everything held precedes the step, whose own keys were appended last in order), so the mask is no mask at all
for a decode step and ``is_causal`` for a first prefill chunk, forms SDPA serves with its flash backend on GPU
(later chunks: a lower-right causal bias; with GQA, which SDPA's lower-right bias does not take, over keys and
values expanded per group). Otherwise (left padding, ragged per-head caches) it gets the boolean mask of
``visible``. ``flash_attention_2`` calls flash-attn's ``flash_attn_func`` (causal, which flash-attn aligns
lower-right, GQA native) in the no-empty case. With empty slots it calls ``flash_attn_with_kvcache`` with
``cache_seqlens``, the entries each row holds: the cache's prefix layout (a row's entries in its first slots, in
position order, the step's valid tokens last) makes a row's visible keys its first ``cache_seqlens`` slots,
causal lower-right; ragged heads go as rows of their own (batch x KV heads, one KV head each).

Nothing n x n is materialised: rows for statistics over all prompt queries are computed in blocks of
``ROW_BLOCK`` queries.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from kvbench.cache import EMPTY, LayerCache

ROW_BLOCK = 256
KERNELS = ("sdpa", "flash_attention_2")


def attention(
    query: torch.Tensor,
    layer: LayerCache,
    query_positions: torch.Tensor,
    scale: float,
    group_size: int,
    kernel: str,
    empty: bool | None = None,
) -> torch.Tensor:
    """Attention of ``query`` [B, H, q, D] over the layer's held slots with ``kernel``; returns [B, H, q, D].

    ``empty``: ``has_empty`` as the engine knows it from host bookkeeping (computed from the tensors if None).
    """
    empty = has_empty(layer, query_positions) if empty is None else empty
    if kernel == "flash_attention_2" and not empty:
        from flash_attn import flash_attn_func

        keys, values = layer.keys.transpose(1, 2), layer.values.transpose(1, 2)
        out = flash_attn_func(query.transpose(1, 2), keys, values, softmax_scale=scale, causal=True)
        return out.transpose(1, 2)
    if kernel == "flash_attention_2" and not layer.holes:
        return flash_with_seqlens(query, layer, scale, group_size)
    masking = sdpa_masking(layer, query_positions, group_size, empty)
    keys, values = layer.keys, layer.values
    if isinstance(masking.get("attn_mask"), CausalBias) and group_size > 1:  # lower-right takes no GQA: expand
        keys, values = keys.repeat_interleave(group_size, dim=1), values.repeat_interleave(group_size, dim=1)
        return F.scaled_dot_product_attention(query, keys, values, scale=scale, **masking)
    return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=group_size > 1, **masking)


def flash_with_seqlens(query: torch.Tensor, layer: LayerCache, scale: float, group_size: int) -> torch.Tensor:
    """flash-attn over a cache with empty slots (padding, ragged heads): ``flash_attn_with_kvcache`` on the
    buffers, each row seeing its first ``cache_seqlens`` = held slots, causal lower-right. Returns [B, H, q, D]."""
    from flash_attn import flash_attn_with_kvcache

    batch, heads, q_len, dim = query.shape
    held = layer.held().to(torch.int32)  # [B, Hkv], after the step's own entries
    if layer.heads_aligned:
        keys, values = layer.keys.transpose(1, 2), layer.values.transpose(1, 2)  # [B, T, Hkv, D]
        out = flash_attn_with_kvcache(
            query.transpose(1, 2), keys, values, cache_seqlens=held[:, 0], softmax_scale=scale, causal=True
        )
        return out.transpose(1, 2)
    kv_heads = heads // group_size  # ragged: one row per (example, KV head), its query heads as heads
    rows = query.reshape(batch * kv_heads, group_size, q_len, dim).transpose(1, 2)
    keys = layer.keys.reshape(batch * kv_heads, 1, layer.length, dim).transpose(1, 2)
    values = layer.values.reshape(batch * kv_heads, 1, layer.length, -1).transpose(1, 2)
    out = flash_attn_with_kvcache(rows, keys, values, cache_seqlens=held.flatten(), softmax_scale=scale, causal=True)
    return out.transpose(1, 2).reshape(batch, heads, q_len, -1)


def has_empty(layer: LayerCache, query_positions: torch.Tensor) -> bool:
    """Whether any slot of the layer or any query of the step is empty (padding, ragged heads)."""
    return bool((layer.positions == EMPTY).any() | (query_positions == EMPTY).any())


def sdpa_masking(layer: LayerCache, query_positions: torch.Tensor, group_size: int, empty: bool) -> dict[str, Any]:
    """SDPA's masking arguments for a step (after its keys were appended): the cheapest exact form.

    ``empty`` is ``has_empty(layer, query_positions)``, computed once per step by the caller.
    """
    q_len = query_positions.shape[-1]
    if empty:
        return {"attn_mask": visible(layer.positions, query_positions, group_size, layer.heads_aligned)}
    if q_len == 1:
        return {}
    if q_len == layer.length:
        return {"is_causal": True}
    return {"attn_mask": causal_lower_right(q_len, layer.length)}


def visible(
    key_positions: torch.Tensor, query_positions: torch.Tensor, group_size: int, shared: bool | None = None
) -> torch.Tensor:
    """Boolean SDPA mask [B, 1 or H, q, T]: a query sees the held keys at or before its position.

    Padding queries (position EMPTY) see every slot, which keeps their rows finite; nothing reads them.
    ``shared``: every head holds the same positions (the cache's host flag; computed from the tensor if None).
    """
    if shared is None:
        shared = bool((key_positions == key_positions[:, :1]).all())
    keys = key_positions[:, :1] if shared else key_positions
    mask = keys[:, :, None, :] <= query_positions[:, None, :, None]
    return mask if shared else mask.repeat_interleave(group_size, dim=1)


def attention_probs(
    query: torch.Tensor, layer: LayerCache, query_positions: torch.Tensor, scale: float, group_size: int
) -> torch.Tensor:
    """Softmax attention rows [B, H, q, T] of ``query`` over the layer's held keys, in fp32.

    Rows of padding queries are zero. Used only for the rows a policy asked for, beside SDPA's output.
    """
    keys = layer.keys.repeat_interleave(group_size, dim=1) if group_size > 1 else layer.keys
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    mask = visible(layer.positions, query_positions, group_size, layer.heads_aligned)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.masked_fill((query_positions == EMPTY)[:, None, :, None], 0.0)


__all__ = [
    "KERNELS",
    "ROW_BLOCK",
    "attention",
    "attention_probs",
    "flash_with_seqlens",
    "has_empty",
    "sdpa_masking",
    "visible",
]
