"""DuoAttention (Xiao et al., ICLR 2025, arXiv 2410.10819): retrieval heads keep the full cache, streaming heads
keep attention sinks and a recent window."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.cache import LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import Context, Needs, Policy, windows


@dataclass
class DuoAttentionPolicy(Policy):
    """Each KV head is a retrieval head (full cache) or a streaming head (the first ``n_sink`` tokens and the
    last ``recent``), by a per-model head pattern (§3.2-3.3).

    The paper's rule (§3.2): a gate alpha per KV head mixes full and streaming attention,
    alpha * full + (1 - alpha) * streaming; the gates are optimised on synthetic multi-passkey data (passkeys
    hidden in long text, the answer recalling them) to match the full model's final hidden states on the answer
    tokens, with an L1 penalty on alpha; heads with the highest alpha become retrieval heads, as many as the
    target ratio allows (§3.3; deployment uses 64 sinks and 256 recent tokens, the defaults here).

    **Approximation** (the patterns are estimated, not learned): ``kvbench.calibration.duoattention`` runs the
    model once over a small calibration set of synthetic multi-passkey prompts (built with the model's
    tokenizer) and scores each KV head by the relative L2 deviation of its streaming attention output from its
    full attention output, on the answer tokens' queries, averaged over the head's query group and the
    prompts. Each layer is scored on its own inputs (the paper's loss is on the final hidden states, through
    every layer). The scores are cached per model and settings as safetensors with a manifest, under
    ``patterns`` (``${KVBENCH_CACHE}/duoattention`` by default; ``configs/policy/duoattention.yaml``).

    Budget (kvbench's): fraction or tokens, held per (layer, example) as in Ada-KV: a layer may hold
    capacity x Hkv entries. A streaming head holds w = min(t, n_sink + recent) of the t tokens seen; the layer
    gets r = floor(Hkv (capacity - w) / (t - w)) retrieval heads (all when t <= w), the r best-scored heads
    of that layer, so the same number in every layer. When capacity < w even all-streaming does not fit, and
    the streaming window shrinks to the capacity, sinks and recent in the ratio n_sink : recent (deviation).
    The paper chooses retrieval heads by one threshold over all layers and has no per-layer budget.
    Phase: both; the split is recomputed at every eviction, so under a fraction budget r grows with t (it can
    fall by one at a step where floor(budget x t) does not grow; that head keeps its window).
    Memory: kvbench's layout pads a layer's heads to its longest head, so a layer with a retrieval head holds
    full-length tensors; the bytes fall only in layers with none (docs/policies.md).
    """

    n_sink: int = field(default=64, metadata={"min": 0})
    recent: int = field(default=256, metadata={"min": 1})
    patterns: str | None = None  # the pattern cache's folder (None: estimated in memory, not stored)
    model_name: str | None = None  # the model's kvbench name, naming its folder in the cache (the YAML passes it)
    calibration_prompts: int = 4  # synthetic multi-passkey prompts
    calibration_tokens: int = 2048  # tokens per prompt (at most the model's context)
    calibration_passkeys: int = 5  # passkeys per prompt, spread over its depth
    seed: int = 0
    needs = Needs(calibration="duoattention")

    def __post_init__(self) -> None:
        self.scores: torch.Tensor | None = None  # [L, Hkv]: higher = more of a retrieval head
        self.manifest: dict[str, Any] = {}
        self._ranks: dict[torch.device, torch.Tensor] = {}

    def use_patterns(self, scores: torch.Tensor, manifest: dict[str, Any]) -> None:
        """Take the head scores [L, Hkv] of the model about to run (from ``kvbench.calibration``)."""
        if scores.dim() != 2:
            raise UserError(f"duoattention: head scores must be [layers, KV heads], got {tuple(scores.shape)}")
        self.scores, self.manifest, self._ranks = scores.float().cpu(), manifest, {}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "patterns_key": self.manifest.get("key")}

    def split(self, seen: int, capacity: int, heads: int) -> tuple[int, int, int]:
        """(sinks, recent, retrieval heads) of a layer of ``heads`` KV heads at ``seen`` tokens, ``capacity``
        entries per head."""
        width = min(seen, self.n_sink + self.recent)
        sink, recent = self.n_sink, self.recent
        if capacity < width:  # all-streaming does not fit: the window shrinks to the capacity
            sink = capacity * self.n_sink // (self.n_sink + self.recent)
            sink, recent, width = sink, capacity - sink, capacity
        if seen <= width:
            return sink, recent, heads
        return sink, recent, min(heads, max(0, heads * (capacity - width) // (seen - width)))

    def ranks(self, layer_idx: int, n_layers: int, heads: int, device: torch.device) -> torch.Tensor:
        """Each KV head's rank in its layer by score, 0 = most retrieval-like (ties: lower head index first)."""
        if self.scores is None:
            raise UserError(
                "duoattention: no head patterns; kvbench.calibration.prepare(policy, model, tokenizer) computes "
                "them (the runner calls it when it loads the model)"
            )
        if tuple(self.scores.shape) != (n_layers, heads):
            raise UserError(
                f"duoattention: the head patterns are {tuple(self.scores.shape)} (layers, KV heads), the model "
                f"has ({n_layers}, {heads}); they belong to another model"
            )
        if device not in self._ranks:
            order = self.scores.argsort(dim=1, descending=True, stable=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(heads).expand_as(order).contiguous())
            self._ranks[device] = ranks.to(device)
        return self._ranks[device][layer_idx]

    def _splits(self, layer: LayerCache, ctx: Context) -> list[tuple[int, int, int, int]]:
        """(seen, sinks, recent, retrieval heads) per example, on the host."""
        if ctx.capacity is None:
            raise UserError("policy 'duoattention' needs a budget (budget=<fraction> or budget_tokens=<n>)")
        seen = ctx.seen_host if ctx.seen_host is not None else ctx.seen.tolist()
        capacity = ctx.capacity_host if ctx.capacity_host is not None else ctx.capacity.tolist()
        heads = layer.keys.shape[1]
        return [(t, *self.split(t, c, heads)) for t, c in zip(seen, capacity, strict=True)]

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        splits = self._splits(layer, ctx)
        device, heads = layer.positions.device, layer.keys.shape[1]
        seen, sink, recent, retrieval = torch.tensor(splits, device=device).unbind(-1)  # [B] each
        positions = layer.positions
        streaming = (positions < sink[:, None, None]) | (positions >= (seen - recent)[:, None, None])
        ranks = self.ranks(ctx.layer_idx, ctx.n_layers, heads, device)  # [Hkv]
        full = ranks[None, :] < retrieval[:, None]  # [B, Hkv]
        return layer.valid & (full[..., None] | streaming)

    def kept_length(self, layer: LayerCache, ctx: Context) -> tuple[int | None, bool]:
        """A retrieval head holds at most the t tokens seen, a streaming head its window."""
        bounds = [t if r > 0 else min(t, s + w) for t, s, w, r in self._splits(layer, ctx)]
        return max(bounds), False

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        if capacity is None:
            return []
        sink, recent, _ = self.split(prompt_tokens, capacity, 1)
        return windows(prompt_tokens, head=sink, tail=recent)
