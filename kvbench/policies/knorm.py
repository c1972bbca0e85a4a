"""Key-norm eviction (Devoto et al. 2024, arXiv 2406.11430): keys with a low L2 norm draw high attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import Context, ScorerPolicy


@dataclass
class KnormPolicy(ScorerPolicy):
    """Keep the keys with the smallest L2 norm (score = -||k||, computed in fp32).

    Phase: both (§3 of the paper compresses while generating). Budget: fraction or tokens. Needs no attention.
    """

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        return -layer.keys.float().norm(dim=-1)
