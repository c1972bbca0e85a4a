"""The compressed KV cache: per layer, per (example, KV head) slots that eviction physically removes.

Layout (the "padded" ragged layout): every layer holds ``keys``/``values`` of shape [B, Hkv, T, D], where T is
the largest number of entries any (example, head) keeps. A slot is empty when its position is ``EMPTY``; an
empty position is larger than any query position, so the causal test ``key_pos <= query_pos`` hides it with no
separate mask. Eviction gathers the kept slots to the front and cuts T, so the freed memory is really freed.
Per-slot policy statistics (cumulative attention, streaks, ...) live in ``stats`` and travel with their slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EMPTY = torch.iinfo(torch.int32).max


@dataclass
class LayerCache:
    """One layer's cache. ``positions`` are the tokens' original positions (their RoPE is kept)."""

    keys: torch.Tensor | None = None  # [B, Hkv, T, D]
    values: torch.Tensor | None = None  # [B, Hkv, T, D]
    positions: torch.Tensor | None = None  # [B, Hkv, T] int32, EMPTY for unused slots
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, Hkv, T, ...]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # policy state not tied to slots (LESS's H, z)
    # Host-side bookkeeping, so that the hot path never reads a tensor to decide what to do:
    may_have_empty: bool = False  # some slot may be EMPTY (padding, ragged heads); False guarantees none is
    heads_aligned: bool = True  # every KV head of an example holds the same positions
    host: dict[str, int] = field(default_factory=dict)  # policy counters kept on the host (ring indices, flags)
    untrimmed: torch.Tensor | None = None  # [] largest kept count of a keep() whose length was not known
    defer_trim: bool = False  # an engine's layer: ``KVCache.trim_pending`` cuts once per step for all layers

    def __post_init__(self) -> None:
        if self.positions is not None:  # built from tensors (tests, tools): derive the flags once
            self.may_have_empty = bool((self.positions == EMPTY).any())
            self.heads_aligned = bool((self.positions == self.positions[:, :1]).all())

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def valid(self) -> torch.Tensor:  # [B, Hkv, T] bool
        return self.positions != EMPTY

    def held(self) -> torch.Tensor:
        """Entries held per (example, KV head): [B, Hkv]."""
        return self.valid.sum(-1)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, padded: bool = True) -> None:
        """Append new entries. keys/values [B, Hkv, q, D]; positions [B, q] (EMPTY for padding).

        ``padded``: whether ``positions`` may hold EMPTY (the caller knows it from the batch layout).
        """
        batch, heads, q_len, _ = keys.shape
        self.may_have_empty |= padded
        new_positions = positions.to(torch.int32)[:, None, :].expand(batch, heads, q_len)
        if self.keys is None:
            self.keys, self.values, self.positions = keys, values, new_positions.contiguous()
            return
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)
        self.positions = torch.cat([self.positions, new_positions], dim=2)
        for name, stat in self.stats.items():
            self.stats[name] = torch.cat([stat, stat.new_zeros(batch, heads, q_len, *stat.shape[3:])], dim=2)

    def stat(self, name: str, dtype: torch.dtype = torch.float32, trailing: tuple[int, ...] = ()) -> torch.Tensor:
        """A per-slot statistic [B, Hkv, T, *trailing], created as zeros on first use."""
        if name not in self.stats:
            shape = (*self.positions.shape, *trailing)
            self.stats[name] = torch.zeros(shape, dtype=dtype, device=self.positions.device)
        return self.stats[name]

    def keep(self, keep: torch.Tensor, length: int | None = None, exact: bool = False, aligned: bool = False) -> None:
        """Keep only the slots where ``keep`` [B, Hkv, T] is true (in their current order); free the rest.

        ``length``: an upper bound on the kept count of every (example, head) that the caller knows on the host
        (a capacity); when None the kept count is read from the device, at once or, for an engine's layer
        (``defer_trim``), by ``KVCache.trim_pending`` once per step for every layer. ``exact``: every
        (example, head) keeps exactly ``length`` (no slot is left empty). ``aligned``: the kept positions are
        the same for every head.
        """
        keep = keep & self.valid
        counts = keep.sum(-1)  # [B, Hkv]
        if length is None and self.defer_trim:
            new_length = self.length
            self.untrimmed = counts.amax() if counts.numel() else None
        elif length is None:
            new_length = int(counts.max()) if counts.numel() else 0
        else:
            new_length = min(length, self.length)
        self.may_have_empty = self.may_have_empty or not exact
        self.heads_aligned = self.heads_aligned and aligned
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :new_length]
        self.keys = _gather_slots(self.keys, order)
        self.values = _gather_slots(self.values, order)
        positions = self.positions.gather(2, order)
        slot = torch.arange(new_length, device=order.device)
        self.positions = torch.where(slot < counts[..., None], positions, EMPTY)
        self.stats = {name: _gather_slots(stat, order) for name, stat in self.stats.items()}

    def trim(self, length: int) -> None:
        """Cut every slot from ``length`` on (all empty after a ``keep`` without a known length); frees them."""
        self.untrimmed = None
        if length >= self.length:
            return
        self.keys, self.values = self.keys[:, :, :length].clone(), self.values[:, :, :length].clone()
        self.positions = self.positions[:, :, :length].clone()
        self.stats = {name: stat[:, :, :length].clone() for name, stat in self.stats.items()}

    def kv_nbytes(self) -> int:
        """Bytes of the key and value tensors actually allocated."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def side_nbytes(self) -> int:
        """Bytes held beside the KV: positions, per-slot statistics and other policy state of this layer."""
        held = sum(tensor.nbytes for tensor in [*self.stats.values(), *self.extra.values()])
        return held + (0 if self.positions is None else self.positions.nbytes)


def _gather_slots(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Gather slots (dim 2) of a [B, Hkv, T, ...] tensor by ``order`` [B, Hkv, T']."""
    index = order.reshape(*order.shape, *([1] * (tensor.dim() - 3))).expand(*order.shape, *tensor.shape[3:])
    return tensor.gather(2, index)


@dataclass
class KVCache:
    """All layers' caches."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([LayerCache(defer_trim=True) for _ in range(n_layers)])

    def nbytes(self) -> int:
        """Everything held: keys, values, positions, statistics and other policy state."""
        return sum(layer.kv_nbytes() + layer.side_nbytes() for layer in self.layers)

    def held(self) -> torch.Tensor:
        """Entries held per (layer, example, KV head): [L, B, Hkv]."""
        return torch.stack([layer.held() for layer in self.layers])

    def trim_pending(self) -> None:
        """Apply the deferred cuts of this step's ``keep`` calls with one host read for all layers."""
        pending = [layer for layer in self.layers if layer.untrimmed is not None]
        if pending:
            lengths = torch.stack([layer.untrimmed for layer in pending]).tolist()
            for layer, length in zip(pending, lengths, strict=True):
                layer.trim(int(length))
