"""A policy applied to one batch: the cache it owns, the batch's state, and the one capacity rule.

Each layer's attention (routed here by ``hooks.attach``) appends the step's new post-RoPE keys and values to the
kvbench ``LayerCache``, attends (``kernels``), hands the policy the queries and attention rows it asked for
(``Needs``), and lets it evict. The step (query positions, phase, windows) comes with every forward pass as an
argument (``Step``), never as engine state written from outside.

Capacity rule (``Engine.capacity``, the one place it is computed): an (example, KV head) may hold the budget's
``floor(budget * t)`` entries (or ``budget_tokens``) of the t tokens seen, plus the held-out prompt tokens seen so
far (the query-agnostic protocol's question, appended after compression), which the budget does not count.

Host syncs: every decision of the hot path (empty slots? heads aligned? over capacity? how long after a cut?)
comes from host bookkeeping (``Step.seen``, the cache's flags), so a decode step reads the device at most twice:
the new tokens in ``generate``, and one read of the kept lengths when a threshold policy cut the cache.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from kvbench.cache import EMPTY, KVCache, LayerCache
from kvbench.engine.kernels import ROW_BLOCK, attention, attention_probs
from kvbench.engine.meters import Meters
from kvbench.policies.base import Budget, Context, Needs, Policy

RECONSTRUCTION_PROMPT = 64  # slots reserved for a scoring pass's instruction tokens (``Needs.reconstruction``)


@dataclass(frozen=True)
class Step:
    """What the forward pass in flight is: its query positions and whether the policy may evict."""

    positions: torch.Tensor  # [B, q] original positions, EMPTY for padding
    phase: str  # "prefill" | "decode"
    evict: bool  # evict at the end of this step
    rows_from: int = 0  # observe query rows from this index of the chunk on (prefill window rows)
    queries_from: int = 0  # pass the queries from this index of the chunk on (``Needs.queries`` window)
    seen: list[int] | None = None  # host: tokens seen per example after this step (``Engine.seen`` without a read)
    padded: bool = True  # host: whether any query of the step is padding (EMPTY)
    columns_left: int = 0  # host: prompt columns after this step (0 for decode and the prompt's last chunk)


@dataclass
class Engine:
    """A policy applied to one batch: the cache it owns, the budget, the batch's prompt, and the meters."""

    policy: Policy
    budget: Budget
    n_layers: int
    group_size: int
    diagnostics: bool = False
    kernel: str = "sdpa"  # one of kernels.KERNELS
    compile: bool = False  # decode steps run the model under torch.compile (``generate.decoder``)
    inv_freq: torch.Tensor | None = None  # the model's RoPE frequencies, set by ``hooks.attach``
    cache: KVCache = field(init=False)
    needs: Needs = field(init=False)  # the policy's needs, resolved once
    meters: Meters = field(init=False)
    prompt_lengths: torch.Tensor | None = field(init=False, default=None)  # [B]
    prompt_lengths_host: list[int] = field(init=False, default_factory=list)
    token_ids: torch.Tensor | None = field(init=False, default=None)  # [B, P] id at each position
    max_new_tokens: int = field(init=False, default=0)
    width: int = field(init=False, default=0)  # prompt columns of the batch (left padding included)
    decode_growth: int = field(init=False, default=0)  # slots a layer may gain over the decode steps (``reserve``)
    _held_out: tuple[torch.Tensor, list[int], torch.Tensor, list[int]] | None = field(init=False, default=None)
    _step: Step | None = field(init=False, default=None)  # the last step attended
    _context: tuple[Step, Context] | None = field(init=False, default=None)
    score_pass_s: float | None = field(init=False, default=None)  # seconds of ``Needs.reconstruction`` passes

    def __post_init__(self) -> None:
        self.cache = KVCache.empty(self.n_layers)
        self.needs = self.policy.needed()
        self.meters = Meters(self.n_layers, self.group_size, diagnostics=self.diagnostics)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, split: int, max_new_tokens: int) -> None:
        """Take a left-padded batch: its prompt lengths, the token id at each position (room for
        ``max_new_tokens`` more) and the held-out columns [split, L) appended after compression."""
        lengths = attention_mask.long().sum(-1)
        self.prompt_lengths, self.prompt_lengths_host = lengths, lengths.tolist()
        self.max_new_tokens, self.width = max_new_tokens, input_ids.shape[1]
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, EMPTY)
        width = max(self.prompt_lengths_host) + max_new_tokens
        ids = torch.full((input_ids.shape[0], width + 1), -1, dtype=torch.long, device=input_ids.device)
        ids.scatter_(1, positions.masked_fill(positions == EMPTY, width).long(), input_ids)
        self.token_ids = ids[:, :width]
        if split < input_ids.shape[1]:
            compressed = attention_mask[:, :split].long().sum(-1)
            held_out = attention_mask[:, split:].long().sum(-1)
            self._held_out = (compressed, compressed.tolist(), held_out, held_out.tolist())

    def reserve(self, chunk_size: int, evict_per_chunk: bool) -> None:
        """Size every layer's buffers for the prefill ahead from host numbers (the sizing rule, with ``fit``).

        A decode step adds one entry; a policy that evicts every step under a known capacity holds, after the
        prompt, at most the capacity's growth over the steps plus that one entry more (``decode_growth``). The
        prefill takes the prompt's columns (with per-chunk eviction under a budget: the capacity at the
        prompt's end plus one chunk) plus that growth. A buffer that must grow beyond this grows by
        ``cache.GROWTH``.
        """
        capacity = self.capacity(self.prompt_lengths, self.prompt_lengths_host)[1]
        steps = max(0, self.max_new_tokens - 1)
        self.decode_growth = steps
        if capacity is not None and self.needs.phase != "prefill":
            final = [length + steps for length in self.prompt_lengths_host]
            grown = max(self.capacity(self.prompt_lengths + steps, final)[1]) - max(capacity) + 1
            self.decode_growth = min(steps, grown)
        slots = self.width
        if evict_per_chunk and capacity is not None:
            slots = min(slots, max(capacity) + chunk_size)
        if self.needs.reconstruction:  # a scoring pass's chunk and its instruction stay until the eviction
            slots += self.needs.reconstruction + RECONSTRUCTION_PROMPT
        for layer in self.cache.layers:
            layer.reserved = slots + self.decode_growth

    def fit(self, layer: LayerCache, columns_left: int) -> None:
        """After a prompt eviction, or at the prompt's end (``columns_left`` = 0): size ``layer``'s buffers to
        the slots in use plus the prompt columns still to come and the decode growth, freeing what eviction
        emptied (shrinking only while prompt columns remain)."""
        slots = layer.length + columns_left + self.decode_growth
        if slots < layer.capacity or (not columns_left and slots != layer.capacity):
            layer.fit(slots)

    def add_tokens(self, positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record the generated (or teacher-forced) ``tokens`` [B] at ``positions`` [B]."""
        self.token_ids[torch.arange(len(tokens), device=tokens.device), positions] = tokens

    def seen(self, step: Step | None = None) -> torch.Tensor:
        """Tokens seen per example [B] after ``step`` (default: the last step attended)."""
        positions = (step or self._step).positions
        return torch.where(positions != EMPTY, positions, -1).amax(-1).long() + 1

    def capacity(self, seen: torch.Tensor, seen_host: list[int] | None) -> tuple[torch.Tensor | None, list | None]:
        """The capacity rule: entries allowed per (example, KV head) [B] at ``seen`` tokens, on the device and,
        when ``seen_host`` is given, on the host; held-out tokens seen so far are allowed on top of the budget."""
        if self._held_out is None:
            host = None if seen_host is None else self.budget.capacity_host(seen_host)
            return self.budget.capacity(seen), host
        compressed, compressed_host, held_out, held_out_host = self._held_out
        allowed = (seen - compressed).clamp(min=0).minimum(held_out)
        capacity = self.budget.capacity(seen - allowed)
        capacity = None if capacity is None else capacity + allowed
        if seen_host is None:
            return capacity, None
        allowed_host = [
            min(max(0, t - c), h) for t, c, h in zip(seen_host, compressed_host, held_out_host, strict=True)
        ]
        base = self.budget.capacity_host([t - a for t, a in zip(seen_host, allowed_host, strict=True)])
        return capacity, None if base is None else [b + a for b, a in zip(base, allowed_host, strict=True)]

    def context(self, layer_idx: int, step: Step) -> Context:
        """The step's context for one layer; the tensors are built once per step and shared by the layers."""
        if self._context is None or self._context[0] is not step:
            seen = self.seen(step)
            capacity, capacity_host = self.capacity(seen, step.seen)
            context = Context(
                layer_idx=0,
                n_layers=self.n_layers,
                phase=step.phase,
                seen=seen,
                prompt_lengths=self.prompt_lengths,
                capacity=capacity,
                token_ids=self.token_ids,
                group_size=self.group_size,
                inv_freq=self.inv_freq,
                capacity_host=capacity_host,
                seen_host=step.seen,
            )
            self._context = (step, context)
        return dataclasses.replace(self._context[1], layer_idx=layer_idx)

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE positions for new tokens at original ``positions`` [B, q] (padding gets 0).

        Normally the original positions. Under ``position_shift`` a new token's position is its rank among the
        held slots: the count held before it (layer 0, head 0; such policies share indices) plus its rank
        among this step's tokens.
        """
        valid = positions != EMPTY
        if not self.needs.position_shift:
            return positions.masked_fill(~valid, 0)
        held = self.cache.layers[0].held()[:, 0] if self.cache.layers[0].keys is not None else 0
        ranks = valid.long().cumsum(-1) - 1 + (held[:, None] if torch.is_tensor(held) else held)
        return ranks.masked_fill(~valid, 0)

    @torch.compiler.disable  # data-dependent policy code: a compiled model calls it eagerly, between its graphs
    def attend(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, step: Step
    ) -> torch.Tensor:
        """query [B, H, q, D]; key/value [B, Hkv, q, D] (new entries only) of ``step``. Returns [B, q, H, D]."""
        if step.phase == "reconstruct":
            return self._attend_reconstruction(layer_idx, query, key, value, scale, step)
        self._step = step
        layer = self.cache.layers[layer_idx]
        layer.append(key, value, step.positions, padded=step.padded)
        empty = layer.may_have_empty or step.padded
        out = attention(query, layer, step.positions, scale, self.group_size, self.kernel, empty=empty)
        meters = self.meters
        if self.diagnostics:
            summary = (step.phase, step.seen, step.padded)
            meters.track_mass(layer.positions, layer_idx, query, key, step.positions, summary, scale)
        policy, needs = self.policy, self.needs
        if policy.adjusts_output():
            out = policy.attention_output(layer, query, out, scale, self.context(layer_idx, step))
        decode = step.phase == "decode"
        if (needs.decode_queries if decode else needs.queries != 0) and step.queries_from < query.shape[2]:
            chosen = slice(step.queries_from, query.shape[2])
            policy.observe_queries(layer, query[:, :, chosen], step.positions[:, chosen], self.context(layer_idx, step))
        if needs.decode_rows if decode else needs.query_rows != 0:
            self._observe_rows(layer, layer_idx, query, scale, step, step.rows_from)
        if step.evict and (not decode or needs.phase != "prefill"):
            policy.evict(layer, self.context(layer_idx, step))
            if not decode:  # the prompt's eviction: free what it emptied now (one read if the cut is data-dependent)
                if layer.untrimmed is not None:
                    layer.trim(int(layer.untrimmed))
                self.fit(layer, step.columns_left)
        meters.bytes(layer, layer_idx, decode)
        if layer_idx == self.n_layers - 1:
            self.cache.trim_pending()  # one host read for every layer whose kept length was data-dependent
            for index in range(self.n_layers):
                meters.bytes(self.cache.layers[index], index, decode)
            if decode or step.evict:
                meters.count_held(self.cache, step.seen if step.seen is not None else self.seen(step).tolist())
            if decode:
                meters.decode_steps += 1
        return out.transpose(1, 2).contiguous()

    def _attend_reconstruction(
        self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, step: Step
    ) -> torch.Tensor:
        """A step of a ``Needs.reconstruction`` scoring pass: its tokens attend to the held entries and to each
        other, every row goes to ``observe``, and its own entries leave the layer again (nothing is evicted)."""
        layer = self.cache.layers[layer_idx]
        length, had_empty = layer.length, layer.may_have_empty
        layer.append(key, value, step.positions, padded=step.padded)
        empty = had_empty or step.padded
        out = attention(query, layer, step.positions, scale, self.group_size, self.kernel, empty=empty)
        self._observe_rows(layer, layer_idx, query, scale, step, 0)
        layer.drop_from(step.positions, length)
        layer.may_have_empty = had_empty  # the step's padding left with its entries
        return out.transpose(1, 2).contiguous()

    def _observe_rows(
        self, layer: LayerCache, layer_idx: int, query: torch.Tensor, scale: float, step: Step, first: int
    ) -> None:
        """Hand the policy the attention rows of the step's queries from ``first`` on, ``ROW_BLOCK`` at a time."""
        ctx = self.context(layer_idx, step)
        for start in range(first, query.shape[2], ROW_BLOCK):
            rows = slice(start, min(start + ROW_BLOCK, query.shape[2]))
            probs = attention_probs(query[:, :, rows], layer, step.positions[:, rows], scale, self.group_size)
            self.policy.observe(layer, probs, step.positions[:, rows], ctx)

    def evict_all(self, step: Step) -> None:
        """The eviction at the end of ``step`` (a prefill step run with ``evict=False``), outside a forward pass:
        every layer, then the meters, as ``attend`` does for a step that evicts (after a scoring pass)."""
        self._step = step
        for index, layer in enumerate(self.cache.layers):
            self.policy.evict(layer, self.context(index, step))
        self.cache.trim_pending()
        for index, layer in enumerate(self.cache.layers):
            self.fit(layer, step.columns_left)
            self.meters.bytes(layer, index, False)
        self.meters.count_held(self.cache, step.seen if step.seen is not None else self.seen(step).tolist())


def make_engine(
    model: torch.nn.Module,
    policy: Policy,
    budget: Budget,
    diagnostics: bool = False,
    kernel: str = "sdpa",
    compile: bool = False,
) -> Engine:
    """An engine for ``policy`` at ``budget`` sized for ``model`` (its layers and query heads per KV head)."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    layers = config.num_hidden_layers
    return Engine(policy, budget, layers, group, diagnostics=diagnostics, kernel=kernel, compile=compile)


__all__ = ["Engine", "Step", "make_engine"]
