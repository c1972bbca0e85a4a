"""FastGen (Ge et al. 2024, arXiv 2310.01801): profile every head on its prompt, then keep what it attends to."""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from typing import Any

import torch

from kvbench.cache import EMPTY, KVCache, LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import ALL_ROWS, Context, Needs, Policy, to_kv_heads, top_capacity

# The ordered hybrid set (§3.2); each entry keeps a superset of the one before.
CHOICES = ("special", "special+punct", "special+punct+frequent", "special+punct+frequent+local", "full")
SPECIAL, PUNCT, FREQUENT, LOCAL, FULL = range(len(CHOICES))
# Words of chat-template role markers (``<|im_start|>user``, ``[INST]``, ``<<SYS>>``) counted as special tokens.
ROLE_WORDS = ("system", "user", "assistant", "inst", "sys")


@dataclass
class FastGenPolicy(Policy):
    """At the end of prefill, give each (layer, KV head) the first of special, +punct, +frequent, +local, full
    whose kept keys receive at least ``recovery`` of the head's attention, averaged over the prompt's query
    rows (§3.2-3.3); then keep the prompt tokens that set keeps for the last row and manage generated tokens
    with it (§3.4). ``r_l``: local window as a fraction of the tokens seen; ``r_f``: frequent (heavy-hitter)
    set size, the same fraction, ranked by attention received over every query so far.

    Phase: both (profile and cut at the end of prefill, then one eviction per decode step). Budget: none,
    compression is the outcome (T = ``recovery``; the paper sweeps 0.91-0.98, 0.95 is our default). A run that
    sets ``budget`` or ``budget_tokens`` is rejected. ``recovery >= 1`` makes every head full (no set but
    full is sure to reach 1).

    Special and punctuation ids come from the tokenizer through ``bind(tokenizer)``: special = the tokenizer's
    special and added-special tokens plus the chat template's role-marker tokens; punctuation = ids whose
    decoded text is non-empty once stripped and made only of punctuation (``string.punctuation`` or a Unicode
    ``P*`` category).

    Deviations (methods.md §3): GQA, which the paper left to future work: the probability rows of a KV head's
    query heads are averaged, and the KV head is profiled on the averaged rows (for a fixed mask that is the
    mean of the heads' recoveries). n, the prompt length behind the r_l/r_f sizes at profiling, includes a
    held-out question (``query_agnostic``); tokens appended after profiling follow the decode rules. Decode:
    a frequent head's set is the top ``floor(r_f * t)`` held tokens by cumulative attention, as at profiling,
    and its newest token is kept for one step so it can collect attention. With ``prefill_eviction=chunked``
    each chunk re-profiles on the rows seen so far (the paper profiles the whole prompt once).
    """

    recovery: float = 0.95
    r_l: float = 0.3
    r_f: float = 0.3
    special_ids: list[int] | None = None
    punct_ids: list[int] | None = None
    needs = Needs(query_rows=ALL_ROWS, decode_rows=True, budget="refused")  # T decides the compression

    def bind(self, tokenizer: Any) -> None:
        """Fill the special and punctuation ids from ``tokenizer`` (the runner calls this before a run)."""
        self.special_ids = special_ids(tokenizer)
        self.punct_ids = punct_ids(tokenizer)

    def params(self) -> dict[str, Any]:
        """Hyper-parameters for the results row; the id lists are summarised by their sizes."""
        return {
            "recovery": self.recovery,
            "r_l": self.r_l,
            "r_f": self.r_f,
            "n_special_ids": None if self.special_ids is None else len(self.special_ids),
            "n_punct_ids": None if self.punct_ids is None else len(self.punct_ids),
        }

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        probs = to_kv_heads(probs, ctx.group_size)  # [B, Hkv, q, T]
        layer.stat("fastgen_score").add_(probs.sum(2))
        if ctx.phase != "prefill":
            layer.stats.pop("fastgen_band", None)
            return
        # Attention each key receives from queries that have it in their local window: with the column sums
        # this gives the exact mean recovery of static ∪ local sets once the static sets are known.
        window = self._count(self.r_l, ctx.prompt_lengths).clamp(min=1)  # [B]
        distance = query_positions.long()[:, None, :, None] - layer.positions.long()[:, :, None, :]
        band = (distance >= 0) & (distance < window[:, None, None, None])  # [B, Hkv, q, T]
        layer.stat("fastgen_band").add_((probs * band).sum(2))
        rows = (query_positions != EMPTY).sum(-1).float()  # [B]
        layer.extra["fastgen_rows"] = layer.extra.get("fastgen_rows", torch.zeros_like(rows)) + rows

    def profile(self, layer: LayerCache, ctx: Context) -> None:
        """Choose a set per (example, KV head): ``extra["fastgen_choice"]`` [B, Hkv] int8 (index in CHOICES)
        and ``extra["fastgen_recovery"]`` [B, Hkv, 5], the mean attention mass each set retains."""
        batch, heads = layer.positions.shape[:2]
        ones = torch.ones(batch, heads, len(CHOICES), device=layer.positions.device)
        if self.recovery >= 1:
            layer.extra["fastgen_choice"] = torch.full((batch, heads), FULL, dtype=torch.int8, device=ones.device)
            layer.extra["fastgen_recovery"] = ones
            layer.host["fastgen_all_full"] = 1
            return
        score, band = layer.stat("fastgen_score"), layer.stat("fastgen_band")  # [B, Hkv, T]
        rows = layer.extra["fastgen_rows"].clamp(min=1)[:, None]  # [B, 1]
        special, punct = self._flags(layer, ctx)
        frequent = top_capacity(score, self._count(self.r_f, ctx.prompt_lengths), layer.valid)
        static = special | punct | frequent
        masses = [(score * mask).sum(-1) for mask in (special, special | punct, static)]
        masses.append(masses[-1] + (band * ~static).sum(-1))  # local rows add their band outside the static set
        recovery = torch.cat([torch.stack(masses, -1) / rows[..., None], ones[..., :1]], -1)  # [B, Hkv, 5]
        choice = (recovery >= self.recovery).to(torch.int8).argmax(-1)  # the first set that reaches T
        layer.extra["fastgen_choice"] = choice.to(torch.int8)
        layer.extra["fastgen_recovery"] = recovery
        layer.host["fastgen_all_full"] = int(bool((choice == FULL).all()))  # read once, at the end of prefill

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        if ctx.phase == "prefill":
            self.profile(layer, ctx)  # the end of prefill (or of a chunk): choose each head's set first
        choice = layer.extra.get("fastgen_choice")
        if choice is None or layer.host.get("fastgen_all_full"):
            return None
        # Sizes come from the prompt length at profiling (as the profile did) and from the tokens seen after.
        length = ctx.prompt_lengths if ctx.phase == "prefill" else ctx.seen
        special, punct = self._flags(layer, ctx)
        frequent = top_capacity(layer.stat("fastgen_score"), self._count(self.r_f, length), layer.valid)
        newest = layer.positions == (ctx.seen - 1)[:, None, None]
        window = self._count(self.r_l, length).clamp(min=1)
        local = layer.valid & (layer.positions >= (ctx.seen - window)[:, None, None])
        choice = choice.long()[..., None]  # [B, Hkv, 1]
        keep = special | (punct & (choice >= PUNCT)) | ((frequent | newest) & (choice >= FREQUENT))
        keep = keep | (local & (choice >= LOCAL)) | (choice == FULL)
        return keep & layer.valid

    def diagnostics(self, cache: KVCache) -> list[dict[str, Any]]:
        """Per example: the set chosen for every (layer, KV head), the attention it recovers on the prompt,
        and how many heads chose each set. Empty before profiling."""
        layers = cache.layers
        if not layers or any("fastgen_choice" not in layer.extra for layer in layers):
            return []
        choice = torch.stack([layer.extra["fastgen_choice"] for layer in layers]).long().cpu()  # [L, B, Hkv]
        recovery = torch.stack([layer.extra["fastgen_recovery"] for layer in layers]).cpu()  # [L, B, Hkv, 5]
        chosen = recovery.gather(-1, choice[..., None])[..., 0]
        return [
            {
                "fastgen_choice": [[CHOICES[c] for c in heads] for heads in choice[:, row].tolist()],
                "fastgen_recovery": chosen[:, row].tolist(),
                "fastgen_choice_counts": {name: int((choice[:, row] == i).sum()) for i, name in enumerate(CHOICES)},
            }
            for row in range(choice.shape[1])
        ]

    def _flags(self, layer: LayerCache, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Held slots whose token is special, and those whose token is punctuation: [B, Hkv, T] each."""
        if self.special_ids is None or self.punct_ids is None:
            raise UserError("policy 'fastgen' needs the tokenizer's special and punctuation ids: call bind(tokenizer)")
        ids = ctx.token_ids  # [B, P]
        index = layer.positions.long().clamp(max=ids.shape[1] - 1).reshape(ids.shape[0], -1)
        slot_ids = ids.gather(1, index).reshape(layer.positions.shape)
        valid = layer.valid
        special = torch.isin(slot_ids, torch.tensor(self.special_ids, dtype=ids.dtype, device=ids.device))
        punct = torch.isin(slot_ids, torch.tensor(self.punct_ids, dtype=ids.dtype, device=ids.device))
        return special & valid, punct & valid

    @staticmethod
    def _count(fraction: float, length: torch.Tensor) -> torch.Tensor:
        return torch.floor(length.double() * fraction + 1e-9).long()


def special_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's special tokens, its added special tokens, and the chat template's role-marker tokens."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return sorted(ids | _role_marker_ids(tokenizer))


def _role_marker_ids(tokenizer: Any) -> set[int]:
    """Tokens of the chat template that spell a role marker (``user``, ``assistant``, ``INST``, ``SYS``).

    Only role words: other template text (Llama-3's date line, a default system prompt) is ordinary text.
    """
    if not getattr(tokenizer, "chat_template", None):
        return set()
    text = None
    system, user = {"role": "system", "content": "\x00"}, {"role": "user", "content": "\x00"}
    for messages in ([system, user], [user]):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            break
        except Exception:  # noqa: BLE001 - templates raise their own errors (e.g. no system role)
            continue
    if not isinstance(text, str):
        return set()
    ids = tokenizer.encode(text, add_special_tokens=False)
    words = [tokenizer.decode([i]).strip().strip("/").lower() for i in ids]
    return {i for i, word in zip(ids, words, strict=True) if len(word) >= 2 and any(word in w for w in ROLE_WORDS)}


def is_punctuation(text: str) -> bool:
    """Non-empty once stripped, and only punctuation characters."""
    text = text.strip()
    return bool(text) and all(c in string.punctuation or unicodedata.category(c).startswith("P") for c in text)


def punct_ids(tokenizer: Any) -> list[int]:
    """Ids whose decoded text is punctuation only (``.``, ``:``, ``?``, `` ."``, ``—``, ...)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return [i for i, text in enumerate(texts) if is_punctuation(text)]
