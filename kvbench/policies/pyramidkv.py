"""PyramidKV (Cai et al. 2024, arXiv 2406.02069): SnapKV selection with budgets shrinking up the layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.policies.base import Context
from kvbench.policies.snapkv import SnapKVPolicy


@dataclass
class PyramidKVPolicy(SnapKVPolicy):
    """SnapKV scores under a per-layer pyramid (§3.3): every layer keeps the last ``window`` prompt tokens (the
    paper's α instruction tokens), and the rest of the budget, R = C - window, is shared in an arithmetic
    sequence from ``2R - R/beta`` at the bottom layer to ``R/beta`` at the top, so the mean over layers is the
    budget C (beta = 20). The top layer therefore always holds its whole window.

    Phase: prefill. Budget: fraction or tokens (the mean over layers). Window 32, kernel 7, max pooling.
    Deviation: a layer cannot hold more than the tokens seen; what the pyramid gives a layer beyond that is
    shared evenly among the layers below the limit (so the mean stays C, and budget 1.0 keeps everything).
    A budget below the window keeps the last C tokens in every layer.
    """

    beta: float = 20.0

    def layer_capacity(self, capacity: torch.Tensor, ctx: Context) -> torch.Tensor:
        total = capacity.double()[:, None]  # [B, 1]
        window = total.clamp(max=float(self.window))
        rest = total - window
        top = rest / self.beta
        bottom = 2 * rest - top
        share = torch.arange(ctx.n_layers, dtype=torch.float64, device=total.device) / max(ctx.n_layers - 1, 1)
        layers = window + bottom - (bottom - top) * share  # [B, L]
        seen = ctx.seen.double()[:, None]
        for _ in range(ctx.n_layers):
            excess = (layers - seen).clamp(min=0).sum(-1, keepdim=True)
            layers = layers.minimum(seen)
            below = layers < seen
            if not bool((excess > 1e-9).any()) or not bool(below.any()):
                break
            layers = layers + below * excess / below.sum(-1, keepdim=True).clamp(min=1)
        return torch.clamp(torch.round(layers[:, ctx.layer_idx]).long(), min=1)
