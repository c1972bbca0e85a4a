"""TOVA, Token Omission Via Attention (Oren et al. 2024, arXiv 2401.06104): the current query decides."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import Context, Needs, ScorerPolicy


@dataclass
class TOVAPolicy(ScorerPolicy):
    """Keep the keys with the highest attention from the last query, averaged over all heads of the layer
    (§3; official ``tova_cache.py``), the same indices for every KV head.

    Phase: both (prefill uses the last prompt token's row, then one eviction per decode step). Budget: fraction
    or tokens (the paper's multi-state size). Needs only the last row.
    """

    needs = Needs(query_rows=1, decode_rows=True)

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        last = probs[:, :, -1].mean(1, keepdim=True)  # [B, 1, T]: mean over all query heads
        layer.stat("tova").copy_(last.expand_as(layer.stat("tova")))

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        return layer.stat("tova")
