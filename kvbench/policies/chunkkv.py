"""ChunkKV (Liu et al. 2025, arXiv 2502.00299): keep whole chunks of consecutive tokens, not single tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import top_capacity
from kvbench.policies.wrapper import WrapperPolicy


@dataclass
class ChunkKVPolicy(WrapperPolicy):
    """Cut the sequence into chunks of ``chunk_size`` consecutive positions, score each chunk by the sum of the
    wrapped scorer's scores over its tokens and over the KV heads, and keep the best whole chunks, the same ones
    in every head, after the scorer's protected tokens (SnapKV's observation window) (§3.1, Algorithm 1: the
    paper's scorer is SnapKV's window attention; ``scorer`` takes any score policy).

    Phase, rows and protected tokens: the scorer's. Budget: fraction or tokens; chunks are taken in score
    order while they fit, so up to ``chunk_size - 1`` entries of the capacity may stay unused (the paper keeps
    floor((capacity - window) / chunk_size) chunks). Deviations: a chunk already cut by an earlier eviction
    (or by the window) competes with what it has left; a signed score (knorm) is shifted per head so that its
    lowest candidate is zero before summing, which leaves the order of full chunks unchanged. Layer-wise
    index reuse (§3.2, an efficiency option) is not implemented: every layer selects its own chunks.
    """

    chunk_size: int = field(default=10, metadata={"min": 1})

    def choose(
        self, layer: LayerCache, scores: torch.Tensor, capacity: torch.Tensor, protected: torch.Tensor | None
    ) -> torch.Tensor:
        valid = layer.valid
        kept = torch.zeros_like(valid)
        if protected is not None:  # the protected slots a top-k would keep (all of them unless over capacity)
            kept = top_capacity(scores, capacity, valid, protected) & protected
        free = valid & ~kept  # [B, Hkv, T] candidates
        scores = scores.float()
        low = scores.masked_fill(~free, math.inf).amin(-1, keepdim=True)
        scores = (scores - low.masked_fill(~torch.isfinite(low), 0.0)).masked_fill(~free, 0.0)
        batch, heads, _ = scores.shape
        n_chunks = int(layer.positions.masked_fill(~valid, 0).max()) // self.chunk_size + 2  # + one bin for none
        chunk = torch.where(free, layer.positions.long() // self.chunk_size, n_chunks - 1)  # [B, Hkv, T]
        flat = chunk.reshape(batch, -1)
        totals = scores.new_zeros(batch, n_chunks).scatter_add_(1, flat, scores.reshape(batch, -1))  # [B, C]
        sizes = scores.new_zeros(batch, heads, n_chunks).scatter_add_(2, chunk, free.float()).amax(1)  # [B, C]
        totals[:, -1], sizes[:, -1] = -math.inf, 0.0
        order = totals.argsort(dim=-1, descending=True, stable=True)  # best chunk first, older first on ties
        room = capacity.double()[:, None] - kept.sum(-1).amax(-1, keepdim=True).double()  # [B, 1]
        fits = sizes.gather(1, order).double().cumsum(-1) <= room  # take chunks in order while they fit
        fits &= fits.long().cumprod(-1).bool()
        chosen = torch.zeros_like(fits).scatter_(1, order, fits)  # [B, C] by chunk index
        return kept | (chosen.gather(1, flat).reshape(chunk.shape) & free)
