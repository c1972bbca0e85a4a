"""StreamingLLM (Xiao et al. 2023, arXiv 2309.17453): attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCache
from kvbench.policies.base import Context, Needs, ScorerPolicy, rotate, sinks, windows


@dataclass
class StreamingLLMPolicy(ScorerPolicy):
    """Keep the first ``n_sink`` tokens and the most recent ``capacity - n_sink`` (§3.2: "4 + recent").

    Phase: both (the official cache evicts before every forward once full). Budget: fraction or tokens; the
    sinks count toward it. Same indices for every head. By default keys keep their original RoPE positions;
    ``position_shift=True`` is the paper's variant (§3.2, ``pos_shift``): positions inside the cache are
    contiguous and the query sits right after them. kvbench re-rotates the kept keys by their change of slot
    rank at each eviction (RoPE rotations compose), which equals caching pre-RoPE keys and rotating them anew.
    """

    n_sink: int = 4
    position_shift: bool = False
    # Sinks and recency: the same positions in every head. The RoPE variant follows the hyper-parameter.
    needs = Needs(position_shift=lambda p: p.position_shift, heads_aligned=True)

    def before_keep(self, layer: LayerCache, keep: torch.Tensor, ctx: Context) -> None:
        if self.position_shift:
            valid = layer.valid
            delta = (keep & valid).long().cumsum(-1) - valid.long().cumsum(-1)  # new rank - old rank
            layer.keys.copy_(rotate(layer.keys, delta, ctx.inv_freq))

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        # Recent tokens rank by recency; among the sinks the earliest rank first (for budgets below n_sink).
        positions = layer.positions.float()
        return torch.where(sinks(layer, self.n_sink), -positions, positions)

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        n_sink = min(self.n_sink, capacity or 0)
        return windows(prompt_tokens, n_sink, (capacity or 0) - n_sink)

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        return sinks(layer, self.n_sink)
