"""KVzip (Kim et al. 2025, arXiv 2505.23416): query-agnostic scores from context reconstruction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.cache import LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import Context, Needs, ScorerPolicy, windows


@dataclass
class KVzipPolicy(ScorerPolicy):
    """After the context is prefilled, the model is asked to repeat it: a repeat prompt followed by the context's
    own tokens is fed after the context, teacher-forced, as extra queries over the context's cache. A context
    KV pair's importance is the largest attention it receives from any of these reconstruction queries, over
    the query heads of its KV head's group and over the reconstruction positions (§3, KV importance
    scoring); the reconstruction's own entries are discarded, and the lowest-scored pairs are evicted to the
    budget. Long contexts are reconstructed in chunks of ``chunk_size`` context tokens (§3, scaling to long
    contexts), so the scoring pass holds one chunk's entries and rows at a time and costs about one more
    prefill: chunk 1 is ``prompt`` + its tokens, chunk k > 1 is ``continued`` + the last ``overlap`` tokens
    of chunk k - 1 + its tokens (the authors' prompts and chunking, 2000 tokens). Each chunk attends to the
    whole held context and to its own earlier tokens, at the positions right after the context. The first
    ``n_sink`` positions are kept (kvpress's stand-in for the system prompt the authors never evict). The
    pass's seconds are the row's ``score_pass_s`` (part of ``prefill_s`` and ``ttft_s``).

    Budget allocation: uniform, the top ``capacity`` pairs per (layer, example, KV head), one of the paper's
    two (§3); the other, non-uniform budgets from one threshold over all layers and heads, is not implemented
    (``adakv`` with ``scorer: kvzip`` shares each layer's budget across its heads instead).

    Phase: prefill; generated tokens are appended uncompressed. The scoring pass runs before each prefill
    eviction: once, after the whole context, or with ``prefill_eviction=chunked`` after each prefill chunk,
    over the tokens prefilled since the previous one (the scores of pairs already held stay, and grow with the
    rows of later passes). Budget: fraction or tokens. Deviations: the softmax of a reconstruction row runs
    over every held context pair and the chunk's own earlier tokens (the authors' code re-normalises it over
    the system prompt, the chunk's own context pairs and the repeat, and scores each pair from its own chunk's
    rows only); no chat-template turn separates the repeat prompt from the repeated tokens; the rows are fp32.
    Side state: one fp32 score per held slot.
    """

    chunk_size: int = field(default=2000, metadata={"min": 1})
    prompt: str = "\n\nRepeat the previous context exactly."
    continued: str = "\n\nRepeat the part of the previous context exactly, starting with"
    overlap: int = field(default=8, metadata={"min": 0})
    n_sink: int = 4
    needs = Needs(phase="prefill", reconstruction=lambda p: p.chunk_size)

    def __post_init__(self) -> None:
        self._prompt_ids: list[int] | None = None
        self._continued_ids: list[int] = []

    def bind(self, tokenizer: Any) -> None:
        """Tokenize the two repeat prompts (the runner calls this before a run)."""
        self._prompt_ids = tokenizer.encode(self.prompt, add_special_tokens=False)
        self._continued_ids = tokenizer.encode(self.continued, add_special_tokens=False)

    def reconstruction_ids(self, context: list[int], start: int, end: int) -> list[int]:
        if self._prompt_ids is None:
            raise UserError("kvzip needs the model's tokenizer: call policy.bind(tokenizer) before generating")
        if start == 0:
            return [*self._prompt_ids, *context[:end]]
        return [*self._continued_ids, *context[max(0, start - self.overlap) : start], *context[start:end]]

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        batch, heads, rows, length = probs.shape
        grouped = probs.reshape(batch, heads // ctx.group_size, ctx.group_size, rows, length)
        score = layer.stat("kvzip")
        torch.maximum(score, grouped.amax(dim=(2, 3)), out=score)

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        return layer.stat("kvzip")

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        """The first ``n_sink`` positions, or as many of the first as the capacity holds."""
        first = ctx.capacity.clamp(max=self.n_sink)[:, None, None]  # [B, 1, 1]
        return layer.valid & (layer.positions < first)

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        return windows(prompt_tokens, head=min(self.n_sink, capacity or 0))
