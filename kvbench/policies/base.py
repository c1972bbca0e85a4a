"""The policy contract: what a policy asks the engine for, and how it says what to keep.

A policy is a dataclass whose fields are its paper's hyper-parameters. It declares what it needs in one
place, the class attribute ``needs = Needs(...)`` (attention rows of the last W prompt queries or of every
decode step, the queries themselves, whether it takes a budget, ...), receives exactly that through
``observe`` (rows) and ``observe_queries`` (queries), and answers ``select`` with a keep mask. A field that
depends on a hyper-parameter is a function of the policy (``query_rows=lambda p: p.window``); ``needed()``
resolves them. ``ScorerPolicy`` turns a score into a keep mask under the budget (top-k per example and KV
head), so most policies write only ``score``. ``kvbench.policies.build`` makes a policy from its YAML node.

Budget rule (one for all policies): the capacity of an (example, KV head) is ``floor(budget * t)`` entries,
t = tokens seen so far, or ``budget_tokens``. Protected tokens (sinks, recent window, observation window)
count toward it. A prefill-only policy (``phase = "prefill"``) is held to it at the end of prefill and then
appends generated tokens, as its paper does; ``both``/``decode`` policies are held to it after every step.

GQA rule: attention probabilities arrive per query head [B, H, q, T]; score policies average them over the g
query heads of a KV head (``to_kv_heads``); threshold policies keep a key if any head of the group needs it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvbench.cache import EMPTY, KVCache, LayerCache
from kvbench.errors import UserError
from kvbench.labels import display_name

ALL_ROWS = -1
PHASES = ("prefill", "both")
BUDGET_RULES = ("required", "optional", "refused", "full")


@dataclass(frozen=True)
class Budget:
    """``fraction`` of the tokens seen (top-level ``budget``), absolute ``tokens`` (``budget_tokens``), or none."""

    kind: str = "none"
    value: float | None = None

    @classmethod
    def from_config(cls, budget: float | None, budget_tokens: int | None) -> Budget:
        if budget is not None and budget_tokens is not None:
            raise UserError("set either budget (a fraction) or budget_tokens (a count), not both")
        if budget_tokens is not None:
            if int(budget_tokens) < 1:
                raise UserError(f"budget_tokens must be a positive integer, got {budget_tokens}")
            return cls("tokens", int(budget_tokens))
        if budget is None:
            return cls()
        if not isinstance(budget, (int, float)) or not 0 < float(budget) <= 1:
            raise UserError(f"budget must be a fraction in (0, 1], got {budget}")
        return cls("fraction", float(budget))

    def capacity(self, seen: torch.Tensor) -> torch.Tensor | None:
        """Entries allowed per example given tokens seen [B]; None when there is no budget."""
        if self.kind == "tokens":
            return torch.full_like(seen, int(self.value))
        if self.kind == "fraction":
            return torch.clamp(torch.floor(seen.double() * self.value + 1e-9).long(), min=1)
        return None

    def capacity_host(self, seen: list[int]) -> list[int] | None:
        """``capacity`` on host numbers: the same rule, with no tensor read."""
        if self.kind == "tokens":
            return [int(self.value)] * len(seen)
        if self.kind == "fraction":
            return [max(1, math.floor(t * self.value + 1e-9)) for t in seen]
        return None

    def label(self) -> float | int | None:
        return self.value


@dataclass(frozen=True)
class Needs:
    """What a policy asks of the engine: its one declaration, the class attribute ``Policy.needs``.

    Any field may instead be a function of the policy (``lambda p: p.window``), for needs that follow a
    hyper-parameter; ``Policy.needed()`` returns the declaration with every such field resolved.
    """

    phase: str = "both"  # "prefill": evict at the end of prefill only; "both": also after every decode step
    query_rows: int | Callable[[Any], int] = 0  # attention rows of the last W prompt queries (ALL_ROWS: all)
    decode_rows: bool | Callable[[Any], bool] = False  # the attention row of every decode step
    queries: int | Callable[[Any], int] = 0  # the last W prompt queries themselves, post-RoPE (ALL_ROWS: all)
    decode_queries: bool | Callable[[Any], bool] = False  # the query of every decode step
    budget: str = "required"  # one of BUDGET_RULES: required | optional | refused (sets its own) | full (1.0 only)
    kv_masked: bool = False  # results are marked: the keys are masked, not freed
    position_shift: bool | Callable[[Any], bool] = False  # RoPE positions = rank among held slots, not original
    heads_aligned: bool = False  # the keep mask is the same for every KV head (position-only rules)
    # Context tokens per chunk of a scoring pass run before each prefill eviction (KVzip's reconstruction):
    # ``Policy.reconstruction_ids`` of each chunk are fed after the context, their rows go to ``observe``
    # (phase "reconstruct") and their own entries are dropped; 0: no such pass.
    reconstruction: int | Callable[[Any], int] = 0
    calibration: str | None = None  # a procedure of ``kvbench.calibration`` run once on the loaded model

    def __post_init__(self) -> None:
        for name, allowed in (("phase", PHASES), ("budget", BUDGET_RULES)):
            value = getattr(self, name)
            if not callable(value) and value not in allowed:
                raise ValueError(f"Needs.{name} must be one of {', '.join(allowed)}, not {value!r}")

    def of(self, policy: Any) -> Needs:
        """This declaration with every field that is a function of the policy evaluated on ``policy``."""
        resolved = {
            f.name: getattr(self, f.name)(policy) for f in dataclasses.fields(self) if callable(getattr(self, f.name))
        }
        return dataclasses.replace(self, **resolved)


@dataclass
class Context:
    """What the engine tells a policy at one layer's eviction point."""

    layer_idx: int
    n_layers: int
    phase: str  # "prefill" | "decode" | "reconstruct" (a ``Needs.reconstruction`` scoring pass)
    seen: torch.Tensor  # [B] tokens seen so far (t)
    prompt_lengths: torch.Tensor  # [B]
    capacity: torch.Tensor | None  # [B] entries allowed per (example, KV head), None = no budget
    token_ids: torch.Tensor  # [B, P] token id at each position (-1 where none)
    group_size: int  # query heads per KV head
    inv_freq: torch.Tensor | None = None  # the model's RoPE frequencies [D/2] (for re-rotating keys)
    capacity_host: list[int] | None = None  # ``capacity`` as host numbers (decisions without a device read)
    seen_host: list[int] | None = None  # ``seen`` as host numbers


@dataclass
class Policy:
    """Base policy: keeps everything (the full cache). Subclasses override what they need."""

    needs: ClassVar[Needs] = Needs()

    def needed(self) -> Needs:
        """``needs`` with the fields that follow hyper-parameters resolved for this instance."""
        return self.needs.of(self)

    def check_budget(self, budget: Budget) -> None:
        """Raise a one-line ``UserError`` when ``budget`` breaks the policy's budget rule (``Needs.budget``)."""
        rule, given = self.needed().budget, budget.kind != "none"
        if rule == "required" and not given:
            raise UserError(
                f"policy '{self.name}' needs a budget: add budget=<fraction in (0, 1]> or budget_tokens=<n>"
            )
        if rule == "refused" and given:
            raise UserError(f"policy '{self.name}' sets its own compression; remove budget/budget_tokens")
        if rule == "full" and given and budget.value != 1.0:
            raise UserError("the full cache keeps everything: use budget=1.0 (or none) with it, or pick a policy")

    def bind(self, tokenizer: Any) -> None:
        """Receive the model's tokenizer before the run (policies that read token ids, e.g. FastGen)."""

    def diagnostics(self, cache: KVCache) -> list[dict[str, Any]]:
        """Policy-specific diagnostics of a finished batch, one dict per example in batch order (e.g. FastGen's
        chosen policy per head for that example); empty when the policy has none."""
        return []

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        """Position ranges [start, end) of a compressed prompt of ``prompt_tokens`` tokens that the policy keeps
        by rule under ``capacity`` entries (sinks, recent or observation window), whatever the scores; [] for
        none. The synthetic tasks flag a needle that falls inside one (it survives by position, not by merit)."""
        return []

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        """Receive attention probabilities [B, H, q, T] over the layer's current slots for query rows at
        ``query_positions`` [B, q] (rows of padding queries are zero)."""

    def observe_queries(
        self, layer: LayerCache, queries: torch.Tensor, query_positions: torch.Tensor, ctx: Context
    ) -> None:
        """Receive the queries [B, H, q, D] (post-RoPE, as attention sees them) at ``query_positions`` [B, q]
        (EMPTY for padding): the last ``needs.queries`` prompt queries, chunk by chunk, and with
        ``needs.decode_queries`` each decode step's. Called before ``observe`` and the eviction of the step."""

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        """Return a keep mask [B, Hkv, T], or None to keep everything."""
        return None

    def reconstruction_ids(self, context: list[int], start: int, end: int) -> list[int]:
        """With ``needs.reconstruction``: the token ids of the scoring pass over the context positions
        [start, end) of one example, whose ids from position 0 to ``end`` are ``context``."""
        raise NotImplementedError(f"policy '{self.name}' declares no reconstruction")

    def attention_output(
        self, layer: LayerCache, query: torch.Tensor, output: torch.Tensor, scale: float, ctx: Context
    ) -> torch.Tensor:
        """Adjust the attention output [B, H, q, D] computed over the held slots (default: unchanged).

        Called after SDPA, before eviction; a policy with state for evicted tokens (LESS) adds it here.
        """
        return output

    def adjusts_output(self) -> bool:
        """Whether the policy overrides ``attention_output`` (the engine skips the call otherwise)."""
        return type(self).attention_output is not Policy.attention_output

    def evict(self, layer: LayerCache, ctx: Context) -> None:
        """The one eviction step: ``select``, then ``before_keep`` (merging, folding, re-rotating what goes),
        then the cut, with the kept length known on the host when ``kept_length`` can tell it."""
        keep = self.select(layer, ctx)
        if keep is None:
            return
        self.before_keep(layer, keep, ctx)
        length, exact = self.kept_length(layer, ctx)
        layer.keep(keep, length, exact, aligned=self.needed().heads_aligned)

    def before_keep(self, layer: LayerCache, keep: torch.Tensor, ctx: Context) -> None:
        """Act on the slots about to go (``layer.valid & ~keep``) before they are freed (default: nothing)."""

    def kept_length(self, layer: LayerCache, ctx: Context) -> tuple[int | None, bool]:
        """Host bound on the slots any (example, head) keeps, and whether each keeps exactly that many.
        None: the count depends on the data (threshold rules); the engine reads it once per step."""
        return None, False

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def name(self) -> str:
        return type(self).__module__.rsplit(".", 1)[-1]

    def display_name(self, budget: Budget) -> str:
        """The name rows, tables and legends show, marked where kvbench extends or approximates the paper."""
        return display_name(self.name, self.params(), budget.kind != "none")


class ScorerPolicy(Policy):
    """Top-k under the budget: keep the ``capacity`` best-scored slots per (example, KV head).

    ``selector(layer, scores, capacity, protected) -> keep`` replaces that top-k: a wrapper (ChunkKV's whole
    chunks, AdaKV's head-adaptive budgets) sets it on the scorer it wraps, which keeps its own scores and
    bookkeeping.
    """

    selector = None

    def score(self, layer: LayerCache, ctx: Context) -> torch.Tensor:
        """Scores [B, Hkv, T], higher = keep."""
        raise NotImplementedError

    def protected(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        """Slots kept before any scored slot [B, Hkv, T] (they still count toward the budget)."""
        return None

    def layer_capacity(self, capacity: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Per-layer capacity; the default is the same for every layer."""
        return capacity

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        if ctx.capacity is None:
            raise UserError(f"policy '{self.name}' needs a budget (budget=<fraction> or budget_tokens=<n>)")
        if self._uniform_layers and ctx.capacity_host is not None:
            # Host test: an (example, head) holds at most min(slots, tokens it has seen); none over capacity.
            bounds = zip(ctx.seen_host, ctx.capacity_host, strict=True)
            if all(min(layer.length, seen) <= capacity for seen, capacity in bounds):
                return None
        elif bool((layer.held() <= self.layer_capacity(ctx.capacity, ctx)[:, None]).all()):
            return None
        capacity = self.layer_capacity(ctx.capacity, ctx)
        scores, protected = self.score(layer, ctx), self.protected(layer, ctx)
        if self.selector is not None:
            return self.selector(layer, scores, capacity, protected)
        return top_capacity(scores, capacity, layer.valid, protected)

    @property
    def _uniform_layers(self) -> bool:
        return type(self).layer_capacity is ScorerPolicy.layer_capacity

    def kept_length(self, layer: LayerCache, ctx: Context) -> tuple[int | None, bool]:
        """Top-k keeps min(held, capacity) per (example, head): known on the host for a uniform capacity."""
        if not self._uniform_layers or ctx.capacity_host is None:
            return None, False
        low, high = min(ctx.capacity_host), max(ctx.capacity_host)
        return high, not layer.may_have_empty and (low == high or low >= layer.length)


def top_capacity(
    scores: torch.Tensor, capacity: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep mask [B, Hkv, T]: per (example, head), protected slots first, then the highest scores, up to
    ``capacity`` [B] (or [B, Hkv]) slots. Ties are broken by slot order (older first), deterministically."""
    scores = scores.float().masked_fill(~valid, -math.inf)
    order = scores.argsort(dim=-1, descending=True, stable=True)
    if protected is not None:
        first = (protected & valid).gather(-1, order).to(torch.int8)
        order = order.gather(-1, first.argsort(dim=-1, descending=True, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    if capacity.dim() == 1:
        capacity = capacity[:, None]
    return (rank < capacity[..., None]) & valid


def rotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE-rotated keys [B, Hkv, T, D] by ``delta`` [B, Hkv, T] positions (rotations compose), in the
    half-split layout of transformers' Llama-family ``rotate_half``."""
    angles = delta.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # [B, Hkv, T, D/2]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = keys.shape[-1] // 2
    rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], -1)
    return (keys.float() * cos + rotated_half.float() * sin).to(keys.dtype)


def below_uniform(
    layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, group_size: int, threshold: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each query row pays less than uniform attention, for every query head of the group.

    ``threshold``: ``step`` compares with 1/t, t the query's absolute step (position + 1); ``cache`` with
    1/(keys the query sees). Returns (minor, seen), both [B, Hkv, q, T]: ``seen`` says which keys a row saw
    (padding rows and later keys of the same chunk did not), and ``minor`` is false where it did not.
    """
    batch, heads, n_rows, length = probs.shape
    query_pos = query_positions.long()  # [B, q]
    seen = layer.positions[:, :, None, :].long() <= query_pos[:, None, :, None]  # [B, Hkv, q, T]
    seen &= (query_positions != EMPTY)[:, None, :, None]
    if threshold == "step":
        bar = 1.0 / (query_pos + 1).clamp(min=1).float()[:, None, :, None]  # [B, 1, q, 1]
    else:
        bar = (1.0 / seen.sum(-1, keepdim=True).clamp(min=1).float()).repeat_interleave(group_size, dim=1)
    minor = (probs < bar).reshape(batch, heads // group_size, group_size, n_rows, length).all(2)
    return minor & seen, seen


def to_kv_heads(probs: torch.Tensor, group_size: int) -> torch.Tensor:
    """Average query-head rows over each KV head's group: [B, H, ...] -> [B, Hkv, ...]."""
    batch, heads = probs.shape[:2]
    return probs.reshape(batch, heads // group_size, group_size, *probs.shape[2:]).mean(2)


def recent(layer: LayerCache, ctx: Context, window: int) -> torch.Tensor:
    """Slots among the last ``window`` tokens seen: [B, Hkv, T]."""
    return layer.valid & (layer.positions >= (ctx.seen - window)[:, None, None])


def windows(n: int, head: int = 0, tail: int = 0) -> list[tuple[int, int]]:
    """The first ``head`` and the last ``tail`` positions of an ``n``-token prompt as [start, end) ranges."""
    head, tail = max(0, min(head, n)), max(0, min(tail, n))
    return [r for r in ((0, head), (n - tail, n)) if r[1] > r[0]]


def sinks(layer: LayerCache, n_sink: int) -> torch.Tensor:
    """The first ``n_sink`` positions of the sequence: [B, Hkv, T]."""
    return layer.positions < n_sink


__all__ = [
    "ALL_ROWS",
    "BUDGET_RULES",
    "EMPTY",
    "PHASES",
    "Budget",
    "Context",
    "Needs",
    "Policy",
    "ScorerPolicy",
    "below_uniform",
    "recent",
    "sinks",
    "top_capacity",
    "windows",
]
