"""H2O, Heavy-Hitter Oracle (Zhang et al. 2023, arXiv 2306.14048): cumulative attention plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import ALL_ROWS, Context, Needs, ScorerPolicy, recent, to_kv_heads, windows


@dataclass
class H2OPolicy(ScorerPolicy):
    """Keep the ``recent_fraction`` x capacity most recent tokens and fill the rest with the heavy hitters:
    the highest attention received, summed over every query so far (§3, Algorithm 1; real-drop code).

    Phase: both (cut to the budget after prefill, one eviction per decode step). Budget: fraction (the
    paper's heavy_ratio + recent_ratio, 0.1 + 0.1 by default, i.e. recent_fraction 0.5) or tokens
    (hh_size + recent_size). Scores of evicted tokens leave with them. GQA: attention averaged over the group.
    Prefill column sums cover all prompt queries, computed in row blocks beside SDPA.
    """

    recent_fraction: float = 0.5
    needs = Needs(query_rows=ALL_ROWS, decode_rows=True)

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        layer.stat("h2o").add_(to_kv_heads(probs, ctx.group_size).sum(2))

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        return layer.stat("h2o")

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        return windows(prompt_tokens, tail=int((capacity or 0) * self.recent_fraction))

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        window = torch.floor(self.layer_capacity(ctx.capacity, ctx) * self.recent_fraction).long()
        return recent(layer, ctx, window)
