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

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def valid(self) -> torch.Tensor:  # [B, Hkv, T] bool
        return self.positions != EMPTY

    def held(self) -> torch.Tensor:
        """Entries held per (example, KV head): [B, Hkv]."""
        return self.valid.sum(-1)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Append new entries. keys/values [B, Hkv, q, D]; positions [B, q] (EMPTY for padding)."""
        batch, heads, q_len, _ = keys.shape
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

    def keep(self, keep: torch.Tensor) -> None:
        """Keep only the slots where ``keep`` [B, Hkv, T] is true (in their current order); free the rest."""
        keep = keep & self.valid
        counts = keep.sum(-1)  # [B, Hkv]
        new_length = int(counts.max()) if counts.numel() else 0
        order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[..., :new_length]
        self.keys = _gather_slots(self.keys, order)
        self.values = _gather_slots(self.values, order)
        positions = self.positions.gather(2, order)
        slot = torch.arange(new_length, device=order.device)
        self.positions = torch.where(slot < counts[..., None], positions, EMPTY)
        self.stats = {name: _gather_slots(stat, order) for name, stat in self.stats.items()}

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
        return cls([LayerCache() for _ in range(n_layers)])

    def nbytes(self) -> int:
        """Everything held: keys, values, positions, statistics and other policy state."""
        return sum(layer.kv_nbytes() + layer.side_nbytes() for layer in self.layers)

    def held(self) -> torch.Tensor:
        """Entries held per (layer, example, KV head): [L, B, Hkv]."""
        return torch.stack([layer.held() for layer in self.layers])
