"""Ada-KV (Feng et al. 2024, arXiv 2407.11550): one budget per layer, shared among its heads by their scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import top_capacity
from kvbench.policies.wrapper import WrapperPolicy


@dataclass
class AdaKVPolicy(WrapperPolicy):
    """Head-adaptive budget allocation (§3.2-3.3, Algorithm 1, Ada-SnapKV): a layer's budget is
    capacity x Hkv entries; each head first keeps its protected tokens (SnapKV's window) and its safeguard,
    its ``alpha`` x capacity best-scored tokens, then the rest of the layer's budget goes to the best scores
    across all heads of the layer (a global top-k), so each head keeps as many entries as its scores earn.

    Config: a wrapper; ``scorer`` names any score policy (SnapKV, the paper's, by default; PyramidKV is its
    other pairing), ``scorer_params`` its fields. Phase, rows and protected tokens: the scorer's. Budget:
    fraction or tokens, per layer and example: the sum over KV heads is at most capacity x Hkv; a single head
    may hold more than the capacity. Scores are compared across heads as they are (attention sums for SnapKV,
    comparable as the paper needs; other scorers' scales are the user's choice).
    Memory: evicted entries are removed, not masked (kvpress masks them). kvbench's layout pads every head of a
    layer to its longest head, and ``kv_bytes`` counts that padding: the saving against the budget is
    exact in the entries held (``kv_kept_fraction``) and as large as the heads are even in the bytes.
    """

    alpha: float = field(default=0.2, metadata={"min": 0.0})  # safeguard share, the paper's alpha

    def choose(
        self, layer: LayerCache, scores: torch.Tensor, capacity: torch.Tensor, protected: torch.Tensor | None
    ) -> torch.Tensor:
        valid = layer.valid
        batch, heads, length = scores.shape
        kept = torch.zeros_like(valid)
        if protected is not None:  # the protected slots a top-k would keep (all of them unless over capacity)
            kept = top_capacity(scores, capacity, valid, protected) & protected
        guard = torch.floor(capacity.double() * min(self.alpha, 1.0)).long()  # [B]
        floor = torch.minimum(kept.sum(-1) + guard[:, None], capacity[:, None])  # [B, Hkv]
        base = top_capacity(scores, floor, valid, kept)  # protected, then the safeguard, per head
        room = capacity * heads - base.sum(dim=(1, 2))  # [B] left of the layer's budget
        free = (valid & ~base).reshape(batch, 1, heads * length)
        extra = top_capacity(scores.reshape(batch, 1, heads * length), room, free)  # one top-k across heads
        return base | extra.reshape(batch, heads, length)
