"""CORM, Cache Optimization with Recent Message (Dai et al. 2024, arXiv 2404.15949): evict long-term minor keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvbench.cache import LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import Context, Needs, Policy, below_uniform, recent, top_capacity, windows

STREAK_MAX = torch.iinfo(torch.int16).max


@dataclass
class CORMPolicy(Policy):
    """A key is *minor* for the query at absolute step t when its attention is below 1/t; a key minor for each
    of the last ``w`` queries is *long-term minor* and is evicted at once, unless it is among the last ``r``
    tokens (§3, "recent message"; the "256+256" setting of v1 Table 1). Each (example, KV head) evicts on its
    own, so head caches are ragged; nothing protects sinks (they survive by their attention).

    Kept as one integer streak per slot (consecutive latest queries that found the key minor; evict at
    ``streak >= w``), which equals the paper's buffer of the last w importance bits (methods.md §1(a)).
    GQA: a key's streak resets if any query head of its group finds it important (methods.md §0).

    Phase: both (the last ``w`` prompt rows, then every decode row). Budget: none — compression is the
    outcome (``budget="optional"``). Under a harness budget it runs *capped*: after its own eviction, a
    (example, head) still above the capacity drops its longest-minor keys (highest streak), never one of the
    last ``r`` unless the capacity is below ``r``. The row's ``budget`` (null or not) tells the two modes apart.

    Assumed choices (methods.md §1 marks them [assumed]): ``threshold="step"`` is 1/t with t the query's
    absolute step; ``"cache"`` is the alternative 1/(keys the query sees in the cache). ``prefill="last_w_rows"``
    observes the last ``w`` prompt queries and evicts at the end of prefill; ``"none"`` starts observing at the
    first decode step. The capped mode is the harness's addition; the paper has no budget.
    """

    w: int = 256
    r: int = 256
    threshold: str = "step"
    prefill: str = "last_w_rows"
    needs = Needs(query_rows=lambda p: p.w if p.prefill == "last_w_rows" else 0, decode_rows=True, budget="optional")

    def __post_init__(self) -> None:
        if self.threshold not in ("step", "cache"):
            raise UserError(f"corm threshold must be 'step' or 'cache', not '{self.threshold}'")
        if self.prefill not in ("last_w_rows", "none"):
            raise UserError(f"corm prefill must be 'last_w_rows' or 'none', not '{self.prefill}'")
        if self.w < 1 or self.r < 0:
            raise UserError(f"corm needs w >= 1 and r >= 0, got w={self.w}, r={self.r}")

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        return windows(prompt_tokens, tail=self.r if capacity is None else min(self.r, capacity))

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        """Update every slot's streak with a block of rows probs [B, H, q, T], in query order."""
        n_rows = probs.shape[2]
        minor, seen = below_uniform(layer, probs, query_positions, ctx.group_size, self.threshold)
        important = seen & ~minor  # [B, Hkv, q, T]: important for at least one query head of the group
        rows = torch.arange(n_rows, device=probs.device)[:, None]  # [q, 1]
        last_important = torch.where(important, rows, -1).amax(2)  # [B, Hkv, T]
        trailing = (seen & (rows > last_important[:, :, None, :])).sum(2)  # minor rows after it
        streak = layer.stat("corm_streak", torch.int16)
        updated = torch.where(last_important >= 0, trailing, streak.long() + trailing)
        streak.copy_(updated.clamp(max=STREAK_MAX))

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        streak = layer.stat("corm_streak", torch.int16)
        protected = recent(layer, ctx, self.r)
        keep = layer.valid & ~((streak.long() >= self.w) & ~protected)
        if ctx.capacity is not None:  # capped: top_capacity keeps all of ``keep`` where it fits
            keep = top_capacity(-streak.float(), ctx.capacity, keep, protected)
        return keep
