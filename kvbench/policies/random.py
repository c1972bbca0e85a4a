"""Random eviction: the floor any informed policy must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import Context, ScorerPolicy


@dataclass
class RandomPolicy(ScorerPolicy):
    """Keep a uniformly random subset of ``capacity`` entries per (example, KV head).

    Phase: both. Budget: fraction or tokens. Scores are drawn from a generator seeded with ``seed``.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        scores = torch.rand(layer.positions.shape, generator=self._generator)
        return scores.to(layer.positions.device)
