"""A fixed-capacity cache after BCT (arXiv 2411.15785): every layer holds at most m entries, updated in place.

An inference-only approximation: the paper's own update rule is unpublished; do not claim BCT numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvbench.cache import LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import ALL_ROWS, Context, Needs, ScorerPolicy, recent, sinks, to_kv_heads, windows

RULES = ("sliding_window", "replace_lowest", "merge")
MERGE_BLOCK = 256  # evicted slots compared with the kept ones per block (bounds the similarity matrix)


@dataclass
class FixedCapacityPolicy(ScorerPolicy):
    """The contract of the Bounded-Cache Transformer (BCT, arXiv 2411.15785, abstract and §1; methods.md §4):
    each layer's cache has a hard capacity m that it never exceeds, and is updated in place as tokens arrive.
    An inference-only approximation: the paper's own update rule is unpublished; do not claim BCT numbers.

    ``rule`` picks a training-free update (methods.md §4 (1)-(3)):

    * ``sliding_window``: the first ``n_sink`` tokens plus the most recent ones (= StreamingLLM);
    * ``replace_lowest``: the newest token replaces the slot with the lowest accumulated attention (attention
      received, summed over every query so far and averaged over the KV head's group, as H2O's score);
    * ``merge``: as ``replace_lowest``, but each evicted key/value pair is folded into its most similar kept
      slot (cosine similarity of keys) by attention-weighted averaging, w_i k_i + w_j k_j / (w_i + w_j) with
      w the accumulated attention; the merged slot keeps its position and the summed weight. Keys are averaged
      after RoPE (the slots keep their original rotations), an approximation of ours.

    Phase: both (cut to m after prefill, then one update per decode step). Budget: ``budget_tokens=m`` is the
    BCT contract (m never grows); a fraction follows the harness rule m = floor(fraction * t), which grows
    with t. The newest token is always admitted (it is never the one replaced). Per KV head, the same m.
    """

    rule: str = "merge"
    n_sink: int = 4
    needs = Needs(
        query_rows=lambda p: 0 if p.rule == "sliding_window" else ALL_ROWS,
        decode_rows=lambda p: p.rule != "sliding_window",
    )

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise UserError(f"fixed_capacity rule must be one of {', '.join(RULES)}, not '{self.rule}'")

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        layer.stat("fixed_capacity").add_(to_kv_heads(probs, ctx.group_size).sum(2))

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        if self.rule == "sliding_window":
            # Recent tokens rank by recency; among the sinks the earliest rank first.
            positions = layer.positions.float()
            return torch.where(sinks(layer, self.n_sink), -positions, positions)
        return layer.stat("fixed_capacity")

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        if self.rule == "sliding_window":  # sinks, then the most recent tokens
            n_sink = min(self.n_sink, capacity or 0)
            return windows(prompt_tokens, n_sink, (capacity or 0) - n_sink)
        return windows(prompt_tokens, tail=1)

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        if self.rule == "sliding_window":
            return sinks(layer, self.n_sink)
        return recent(layer, ctx, 1)

    def before_keep(self, layer: LayerCache, keep: torch.Tensor, ctx: Context) -> None:
        if self.rule == "merge":
            merge_evicted(layer, keep, layer.stat("fixed_capacity"))


@torch.no_grad()
def merge_evicted(layer: LayerCache, keep: torch.Tensor, weight: torch.Tensor) -> None:
    """Fold every evicted slot (valid, not in ``keep`` [B, Hkv, T]) into its most key-similar kept slot,
    in place: keys and values become weight-averaged, ``weight`` [B, Hkv, T] is summed into the kept slot."""
    evicted = layer.valid & ~keep  # may be empty: then every slot keeps its own keys, values and weight
    batch, heads, length, dim = layer.keys.shape
    unit = F.normalize(layer.keys.float(), dim=-1)  # [B, Hkv, T, D]
    # Nearest kept slot of every slot (only evicted ones are used), in blocks of rows.
    target = torch.zeros(batch, heads, length, dtype=torch.long, device=keep.device)
    for start in range(0, length, MERGE_BLOCK):
        rows = slice(start, min(start + MERGE_BLOCK, length))
        similarity = torch.matmul(unit[:, :, rows], unit.transpose(-1, -2))  # [B, Hkv, block, T]
        target[:, :, rows] = similarity.masked_fill(~keep[:, :, None, :], -torch.inf).argmax(-1)
    # Positive weights so that slots no query has seen yet still average (equally).
    w = weight.float().clamp(min=0) + 1e-6  # [B, Hkv, T]
    moving = torch.where(evicted, w, 0.0)  # weight each slot sends to its target
    index = torch.where(evicted, target, torch.arange(length, device=keep.device))  # [B, Hkv, T]
    total = w.masked_fill(evicted, 0.0).scatter_add(-1, index, moving)  # [B, Hkv, T] kept weight + received
    receives = keep & (torch.zeros_like(index).scatter_add(-1, index, evicted.long()) > 0)  # slots that merge
    for name in ("keys", "values"):
        tensor = getattr(layer, name)
        own = tensor.float() * torch.where(evicted, 0.0, w)[..., None]
        summed = own.scatter_add(2, index[..., None].expand(-1, -1, -1, dim), tensor.float() * moving[..., None])
        merged = summed / total.clamp(min=1e-12)[..., None]
        setattr(layer, name, torch.where(receives[..., None], merged.to(tensor.dtype), tensor))
    received = weight.masked_fill(evicted, 0.0).scatter_add(-1, index, weight.masked_fill(~evicted, 0.0))
    weight.copy_(torch.where(keep, received, weight))
