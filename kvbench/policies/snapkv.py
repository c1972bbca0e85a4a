"""SnapKV (Li et al. 2024, arXiv 2404.14469): the prompt's last queries vote for the keys to keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from kvbench.cache import LayerCache
from kvbench.policies.base import Context, Needs, ScorerPolicy, recent, to_kv_heads, windows


@dataclass
class SnapKVPolicy(ScorerPolicy):
    """Sum the attention of the last ``window`` prompt queries over the prefix, pool it along the prefix's
    positions only (``pooling`` with ``kernel``, stride 1, same padding; the window's own columns take no part,
    as in the official code), keep the top prefix entries per head plus the window (§4.2, Algorithm 1).
    Defaults are the LongBench runs' (window 32, kernel 7, max pooling).

    Phase: prefill (generated tokens are appended uncompressed, as in the paper). Budget: fraction or tokens
    (the paper's prompt capacity), the window included. GQA: scores averaged over the group (kvpress's
    choice; the official code repeats KV to every query head, which saves no memory on GQA models).
    """

    window: int = 32
    kernel: int = 7
    pooling: Literal["max", "avg"] = "max"
    needs = Needs(phase="prefill", query_rows=lambda p: p.window)

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        layer.stat("snapkv").add_(to_kv_heads(probs, ctx.group_size).sum(2))

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        keep = super().select(layer, ctx)
        layer.stats.pop("snapkv", None)  # a fresh vote for every eviction (each chunk in chunked prefill)
        return keep

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        votes = layer.stat("snapkv").masked_fill(self.protected(layer, ctx), 0.0)  # prefix columns only
        batch, heads, length = votes.shape
        flat = votes.reshape(batch * heads, 1, length)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(flat, self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.reshape(batch, heads, length)

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        return windows(prompt_tokens, tail=min(self.window, capacity or 0))  # the observation window

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        return recent(layer, ctx, self.window)
