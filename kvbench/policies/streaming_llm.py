"""StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import Context, ScorerPolicy, sinks


@dataclass
class StreamingLLMPolicy(ScorerPolicy):
    """Keep the first ``n_sink`` tokens and the most recent ``capacity - n_sink`` (§3.2: "4 + recent").

    Phase: both (the official cache evicts before every forward once full). Budget: fraction or tokens; the
    sinks count toward it. Same indices for every head. Keys keep their original RoPE positions (the paper's
    position shift re-indexes them inside the cache; not applied here).
    """

    n_sink: int = 4

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        # Recent tokens rank by recency; among the sinks the earliest rank first (for budgets below n_sink).
        positions = layer.positions.float()
        return torch.where(sinks(layer, self.n_sink), -positions, positions)

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        return sinks(layer, self.n_sink)
