"""The only module that touches transformers' attention: ``with attach(model, engine):``.

kvbench registers its own attention function and calls the model with ``use_cache=False``, so transformers
keeps no cache at all: each layer's attention receives the new (post-RoPE) keys and values, appends them to
kvbench's ``LayerCache``, attends, computes the extra attention rows the policy asked for, and lets the policy
evict. Nothing n x n is materialised: rows for statistics over all prompt queries are computed in blocks of
``ROW_BLOCK`` queries.

Attention kernels (``attention=``): ``sdpa`` (default) gives SDPA the cheapest exact mask. When no slot and no
query is empty, the visible keys of query i of a q-token step over T slots are exactly slots 0..T-q+i
(everything held precedes the step, whose own keys were appended last in order), so the mask is no mask at all
for a decode step and ``is_causal`` for a first prefill chunk, forms SDPA serves with its flash backend on GPU
(later chunks: a lower-right causal bias; with GQA, which SDPA's lower-right bias does not take, over keys and
values expanded per group). Otherwise (left padding, ragged per-head caches) it gets the boolean mask
of ``visible``.
Host syncs: every decision of the hot path (empty slots? heads aligned? over capacity? how long after a cut?)
comes from host bookkeeping (``Step.seen``, the cache's flags), so a decode step reads the device at most
twice: the new tokens in ``generate``, and one read of the kept lengths when a threshold policy cut the cache.
``flash_attention_2`` calls flash-attn's ``flash_attn_func`` (causal, which flash-attn aligns lower-right, GQA
native) in the no-empty case and falls back to SDPA with the boolean mask otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right

from kvbench.cache import EMPTY, KVCache, LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import Budget, Context, Needs, Policy

ATTENTION_NAME = "kvbench"
ROW_BLOCK = 256
KERNELS = ("sdpa", "flash_attention_2")


@dataclass
class Step:
    """What the forward pass in flight is: its query positions and whether the policy may evict."""

    positions: torch.Tensor  # [B, q] original positions, EMPTY for padding
    phase: str  # "prefill" | "decode"
    evict: bool  # evict at the end of this step
    rows_from: int = 0  # observe query rows from this index of the chunk on (prefill window rows)
    queries_from: int = 0  # pass the queries from this index of the chunk on (``Needs.queries`` window)
    seen: list[int] | None = None  # host: tokens seen per example after this step (``Engine.seen`` without a read)
    padded: bool = True  # host: whether any query of the step is padding (EMPTY)


@dataclass
class Engine:
    """A policy applied to one batch: the cache it owns, the budget, and per-run diagnostics."""

    policy: Policy
    budget: Budget
    n_layers: int
    group_size: int
    diagnostics: bool = False
    kernel: str = "sdpa"  # one of KERNELS
    diagnostics_every: int = 16  # with diagnostics: the attention mass is measured every this many decode steps
    cache: KVCache = field(init=False)
    step: Step | None = None
    prompt_lengths: torch.Tensor | None = None  # [B]
    prompt_lengths_host: list[int] = field(default_factory=list)
    compressed_lengths: torch.Tensor | None = None  # [B] prompt tokens under compression (the rest is held out)
    held_out: torch.Tensor | None = None  # [B] prompt tokens appended after compression (query-agnostic)
    token_ids: torch.Tensor | None = None  # [B, P] id at each position
    peak_nbytes: int = 0  # keys, values and side state (positions, statistics, policy state)
    peak_kv_nbytes: int = 0  # keys and values only
    peak_decode_nbytes: int = 0  # everything held, during decode (the compressed cache while generating)
    shadow_keys: list[LayerCache] = field(default_factory=list)
    mass_sum: torch.Tensor | None = None  # [L, B, Hkv] attention mass retained, summed over decode steps
    mass_steps: int = 0
    inv_freq: torch.Tensor | None = None  # the model's RoPE frequencies, set by ``attach``
    held_sum: torch.Tensor | None = None  # [B] entries held, summed over layers, heads and steps (on device)
    full_sum: torch.Tensor | None = None  # [B] entries a full cache would hold, same sums (host)
    compressed_lengths_host: list[int] | None = None
    held_out_host: list[int] | None = None
    decode_steps: int = 0
    _layer_nbytes: list[int] = field(default_factory=list)
    _layer_kv_nbytes: list[int] = field(default_factory=list)
    _context: tuple[Step, Context] | None = None
    needs: Needs = field(init=False)  # the policy's needs, resolved once

    def __post_init__(self) -> None:
        self.needs = self.policy.needed()
        self.cache = KVCache.empty(self.n_layers)
        self._layer_nbytes = [0] * self.n_layers
        self._layer_kv_nbytes = [0] * self.n_layers
        if self.diagnostics:
            self.shadow_keys = [LayerCache() for _ in range(self.n_layers)]

    def seen(self) -> torch.Tensor:
        """Tokens seen so far per example [B] (the largest valid query position + 1)."""
        valid = self.step.positions != EMPTY
        return torch.where(valid, self.step.positions, -1).amax(-1).long() + 1

    def context(self, layer_idx: int) -> Context:
        """The step's context for one layer; the tensors are built once per step and shared by the layers."""
        if self._context is None or self._context[0] is not self.step:
            self._context = (self.step, self._step_context())
        return dataclasses.replace(self._context[1], layer_idx=layer_idx)

    def _step_context(self) -> Context:
        seen = self.seen()
        seen_host = self.step.seen
        if self.held_out is None:
            capacity = self.budget.capacity(seen)
            capacity_host = None if seen_host is None else self.budget.capacity_host(seen_host)
        else:  # held-out tokens seen so far are allowed on top of the budget
            held_out = (seen - self.compressed_lengths).clamp(min=0).minimum(self.held_out)
            capacity = self.budget.capacity(seen - held_out)
            capacity = None if capacity is None else capacity + held_out
            capacity_host = None
            if seen_host is not None and self.held_out_host is not None:
                allowed = [
                    min(max(0, t - c), h)
                    for t, c, h in zip(seen_host, self.compressed_lengths_host, self.held_out_host, strict=True)
                ]
                base = self.budget.capacity_host([t - a for t, a in zip(seen_host, allowed, strict=True)])
                capacity_host = None if base is None else [b + a for b, a in zip(base, allowed, strict=True)]
        return Context(
            layer_idx=0,
            n_layers=self.n_layers,
            phase=self.step.phase,
            seen=seen,
            prompt_lengths=self.prompt_lengths,
            capacity=capacity,
            token_ids=self.token_ids,
            group_size=self.group_size,
            inv_freq=self.inv_freq,
            capacity_host=capacity_host,
            seen_host=seen_host,
        )

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

    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
        """query [B, H, q, D]; key/value [B, Hkv, q, D] (new entries only). Returns [B, q, H, D]."""
        layer = self.cache.layers[layer_idx]
        step = self.step
        layer.append(key, value, step.positions, padded=step.padded)
        empty = layer.may_have_empty or step.padded
        out = attention(query, layer, step.positions, scale, self.group_size, self.kernel, empty=empty)
        if self.diagnostics:
            self._track_mass(layer_idx, query, key, scale)
        policy, needs = self.policy, self.needs
        if policy.adjusts_output():
            out = policy.attention_output(layer, query, out, scale, self.context(layer_idx))
        wants_queries = needs.decode_queries if step.phase == "decode" else needs.queries != 0
        if wants_queries and step.queries_from < query.shape[2]:
            chosen = slice(step.queries_from, query.shape[2])
            policy.observe_queries(layer, query[:, :, chosen], step.positions[:, chosen], self.context(layer_idx))
        wants_rows = needs.decode_rows if step.phase == "decode" else needs.query_rows != 0
        if wants_rows:
            ctx = self.context(layer_idx)
            for start in range(step.rows_from, query.shape[2], ROW_BLOCK):
                rows = slice(start, min(start + ROW_BLOCK, query.shape[2]))
                probs = attention_probs(query[:, :, rows], layer, step.positions[:, rows], scale, self.group_size)
                policy.observe(layer, probs, step.positions[:, rows], ctx)
        if step.evict and (step.phase == "prefill" or needs.phase != "prefill"):
            policy.evict(layer, self.context(layer_idx))
        self._meter_bytes(layer_idx)
        if layer_idx == self.n_layers - 1:
            self.cache.trim_pending()  # one host read for every layer whose kept length was data-dependent
            for index in range(self.n_layers):
                self._meter_bytes(index)
            if step.phase == "decode" or step.evict:
                self._count_held()
            if step.phase == "decode":
                self.decode_steps += 1
        return out.transpose(1, 2).contiguous()

    def _meter_bytes(self, layer_idx: int) -> None:
        """Update the byte peaks after a change of one layer (host metadata only: shapes, no tensor read)."""
        layer = self.cache.layers[layer_idx]
        self._layer_kv_nbytes[layer_idx] = layer.kv_nbytes()
        self._layer_nbytes[layer_idx] = self._layer_kv_nbytes[layer_idx] + layer.side_nbytes()
        total = sum(self._layer_nbytes)
        self.peak_nbytes = max(self.peak_nbytes, total)
        self.peak_kv_nbytes = max(self.peak_kv_nbytes, sum(self._layer_kv_nbytes))
        if self.step.phase == "decode":
            self.peak_decode_nbytes = max(self.peak_decode_nbytes, total)

    def _count_held(self) -> None:
        """Accumulate held vs full-cache entries after a step (end of prefill, every decode step)."""
        held = self.cache.held().sum(dim=(0, 2)).double()  # [B], stays on the device
        seen = self.step.seen if self.step.seen is not None else self.seen().tolist()
        full = torch.tensor(seen, dtype=torch.float64) * self.n_layers * self.cache.layers[0].keys.shape[1]
        self.held_sum = held if self.held_sum is None else self.held_sum + held
        self.full_sum = full if self.full_sum is None else self.full_sum + full

    def kept_fraction(self) -> torch.Tensor:
        """Achieved kept fraction per example [B]: held entries / full-cache entries, over all steps."""
        return self.held_sum.cpu() / self.full_sum

    def final_kept_per_head(self) -> torch.Tensor:
        """Kept fraction at the end, per (layer, example, KV head): [L, B, Hkv]."""
        return self.cache.held().double().cpu() / self.seen().double().cpu()[None, :, None]

    def attention_mass(self) -> torch.Tensor | None:
        """Mean share of the full-history attention on held keys over decode steps and layers [B] (diagnostics)."""
        if self.mass_sum is None or not self.mass_steps:
            return None
        return self.mass_sum.cpu().mean(dim=(0, 2)) / self.mass_steps

    def full_nbytes(self) -> int:
        """Bytes of keys and values a full cache would hold for this batch at its longest."""
        layer = self.cache.layers[0]
        batch, heads, _, dim = layer.keys.shape
        return 2 * self.n_layers * batch * heads * int(self.seen().max()) * dim * layer.keys.element_size()

    def _track_mass(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        """Diagnostics: share of the full-history attention row that falls on slots still held (decode)."""
        shadow = self.shadow_keys[layer_idx]
        shadow.append(key, key[..., :1], self.step.positions, padded=self.step.padded)
        if self.step.phase != "decode" or self.decode_steps % self.diagnostics_every:
            return
        probs = attention_probs(query, shadow, self.step.positions, scale, self.group_size)  # [B, H, 1, T]
        held = self.cache.layers[layer_idx].positions  # [B, Hkv, T']
        marks = torch.zeros(*held.shape[:2], max(self.step.seen) + 1, device=held.device)
        marks.scatter_(-1, torch.where(held == EMPTY, marks.shape[-1] - 1, held).long(), 1.0)
        marks[..., -1] = 0
        shadow_pos = torch.where(shadow.positions == EMPTY, marks.shape[-1] - 1, shadow.positions).long()
        kept = marks.gather(-1, shadow_pos)  # [B, Hkv, T]
        kept = kept.repeat_interleave(self.group_size, dim=1)
        mass = (probs[:, :, 0] * kept).sum(-1)  # [B, H]
        mass = mass.reshape(mass.shape[0], -1, self.group_size).mean(-1)
        if self.mass_sum is None:
            self.mass_sum = torch.zeros(self.n_layers, *mass.shape, dtype=torch.float64, device=mass.device)
        self.mass_sum[layer_idx] += mass.double()
        if layer_idx == self.n_layers - 1:
            self.mass_steps += 1


def attention(
    query: torch.Tensor,
    layer: LayerCache,
    query_positions: torch.Tensor,
    scale: float,
    group_size: int,
    kernel: str,
    empty: bool | None = None,
) -> torch.Tensor:
    """Attention of ``query`` [B, H, q, D] over the layer's held slots with ``kernel``; returns [B, H, q, D].

    ``empty``: ``has_empty`` as the engine knows it from host bookkeeping (computed from the tensors if None).
    """
    empty = has_empty(layer, query_positions) if empty is None else empty
    if kernel == "flash_attention_2" and not empty:
        from flash_attn import flash_attn_func

        keys, values = layer.keys.transpose(1, 2), layer.values.transpose(1, 2)
        out = flash_attn_func(query.transpose(1, 2), keys, values, softmax_scale=scale, causal=True)
        return out.transpose(1, 2)
    masking = sdpa_masking(layer, query_positions, group_size, empty)
    keys, values = layer.keys, layer.values
    if isinstance(masking.get("attn_mask"), CausalBias) and group_size > 1:  # lower-right takes no GQA: expand
        keys, values = keys.repeat_interleave(group_size, dim=1), values.repeat_interleave(group_size, dim=1)
        return F.scaled_dot_product_attention(query, keys, values, scale=scale, **masking)
    return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=group_size > 1, **masking)


def has_empty(layer: LayerCache, query_positions: torch.Tensor) -> bool:
    """Whether any slot of the layer or any query of the step is empty (padding, ragged heads)."""
    return bool((layer.positions == EMPTY).any() | (query_positions == EMPTY).any())


def sdpa_masking(layer: LayerCache, query_positions: torch.Tensor, group_size: int, empty: bool) -> dict[str, Any]:
    """SDPA's masking arguments for a step (after its keys were appended): the cheapest exact form.

    ``empty`` is ``has_empty(layer, query_positions)``, computed once per step by the caller.
    """
    q_len = query_positions.shape[-1]
    if empty:
        return {"attn_mask": visible(layer.positions, query_positions, group_size, layer.heads_aligned)}
    if q_len == 1:
        return {}
    if q_len == layer.length:
        return {"is_causal": True}
    return {"attn_mask": causal_lower_right(q_len, layer.length)}


def visible(
    key_positions: torch.Tensor, query_positions: torch.Tensor, group_size: int, shared: bool | None = None
) -> torch.Tensor:
    """Boolean SDPA mask [B, 1 or H, q, T]: a query sees the held keys at or before its position.

    Padding queries (position EMPTY) see every slot, which keeps their rows finite; nothing reads them.
    ``shared``: every head holds the same positions (the cache's host flag; computed from the tensor if None).
    """
    if shared is None:
        shared = bool((key_positions == key_positions[:, :1]).all())
    keys = key_positions[:, :1] if shared else key_positions
    mask = keys[:, :, None, :] <= query_positions[:, None, :, None]
    return mask if shared else mask.repeat_interleave(group_size, dim=1)


def attention_probs(
    query: torch.Tensor, layer: LayerCache, query_positions: torch.Tensor, scale: float, group_size: int
) -> torch.Tensor:
    """Softmax attention rows [B, H, q, T] of ``query`` over the layer's held keys, in fp32.

    Rows of padding queries are zero. Used only for the rows a policy asked for, beside SDPA's output.
    """
    keys = layer.keys.repeat_interleave(group_size, dim=1) if group_size > 1 else layer.keys
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scale
    mask = visible(layer.positions, query_positions, group_size, layer.heads_aligned)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return probs.masked_fill((query_positions == EMPTY)[:, None, :, None], 0.0)


def _kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature; the mask argument is unused (positions decide)."""
    return module.kvbench_engine.attend(module.layer_idx, query, key, value, scaling), None


def _no_mask(*args, **kwargs) -> None:
    return None


@contextlib.contextmanager
def attach(model: torch.nn.Module, engine: Engine) -> Iterator[Engine]:
    """Route every attention layer of ``model`` through ``engine`` for the duration of the block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _kvbench_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
    previous = model.config._attn_implementation
    modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    for module in modules:
        module.kvbench_engine = engine
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if engine.needs.position_shift and (rotary is None or getattr(rotary, "attention_scaling", 1.0) != 1.0):
        raise UserError("position_shift needs plain RoPE (a rotary_emb without attention scaling)")
    engine.inv_freq = None if rotary is None else rotary.inv_freq
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield engine
    finally:
        model.set_attn_implementation(previous)
        for module in modules:
            del module.kvbench_engine


__all__ = [
    "KERNELS",
    "Engine",
    "Step",
    "attach",
    "attention",
    "attention_probs",
    "has_empty",
    "sdpa_masking",
    "visible",
]
