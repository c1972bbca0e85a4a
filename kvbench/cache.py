"""The compressed KV cache: per layer, per (example, KV head) slots that eviction physically removes.

Layout: every layer owns preallocated buffers ``[B, Hkv, C, D]`` (keys, values; positions ``[B, Hkv, C]``; per-slot
statistics ``[B, Hkv, C, ...]``) sized by the engine once per phase (``reserve``, ``fit``). ``keys``, ``values``,
``positions`` and ``stats`` are views of the first T slots, T being the largest number of slots any
(example, head) uses. New entries are written in place; eviction compacts the kept slots to the front in place.
The bytes reported are the bytes of the buffers, i.e. what is allocated.

Every (example, head) holds its entries in slots ``[0, n)`` in their original order, and its empty slots after
them (the "prefix" invariant): a step's valid tokens are written right after the row's held entries, its padding
after those. An empty slot has position ``EMPTY``, larger than any query position, so the causal test
``key_pos <= query_pos`` hides it with no separate mask; the per-row held count ``n`` is what flash-attn's
``cache_seqlens`` takes. Per-slot policy statistics (cumulative attention, streaks, ...) travel with their slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

EMPTY = torch.iinfo(torch.int32).max
GROWTH = 1.5  # a buffer that must grow beyond its reservation grows by this factor (amortised in-place writes)


@dataclass
class LayerCache:
    """One layer's cache. ``positions`` are the tokens' original positions (their RoPE is kept)."""

    keys: torch.Tensor | None = None  # [B, Hkv, T, D], a view of the first T slots of the key buffer
    values: torch.Tensor | None = None  # [B, Hkv, T, D]
    positions: torch.Tensor | None = None  # [B, Hkv, T] int32, EMPTY for unused slots
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B, Hkv, T, ...] views
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # policy state not tied to slots (LESS's H, z)
    # Host-side bookkeeping, so that the hot path never reads a tensor to decide what to do:
    may_have_empty: bool = False  # some slot may be EMPTY (padding, ragged heads); False guarantees none is
    heads_aligned: bool = True  # every KV head of an example holds the same positions
    host: dict[str, int] = field(default_factory=dict)  # policy counters kept on the host (ring indices, flags)
    untrimmed: torch.Tensor | None = None  # [] largest kept count of a keep() whose length was not known
    defer_trim: bool = False  # an engine's layer: ``KVCache.trim_pending`` cuts once per step for all layers
    reserved: int = 0  # host: slots the next allocation of the buffers takes at least (set by the engine)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # name -> [B, Hkv, C, ...] storage
    holes: bool = False  # built from tensors with empty slots before held ones: compacted at the first append

    def __post_init__(self) -> None:
        if self.positions is not None:  # built from tensors (tests, tools): adopt them and derive the flags once
            self.may_have_empty = bool((self.positions == EMPTY).any())
            self.heads_aligned = bool((self.positions == self.positions[:, :1]).all())
            self.buffers = {"positions": self.positions, **{f"stat:{k}": v for k, v in self.stats.items()}}
            if self.keys is not None:
                self.buffers.update(keys=self.keys, values=self.values)
            valid = self.valid
            self.holes = self.may_have_empty and bool((valid[..., 1:] > valid[..., :-1]).any())

    @property
    def length(self) -> int:
        """Slots in use (T): the views' length."""
        return 0 if self.positions is None else self.positions.shape[2]

    @property
    def capacity(self) -> int:
        """Slots allocated (C >= T)."""
        return 0 if "positions" not in self.buffers else self.buffers["positions"].shape[2]

    @property
    def valid(self) -> torch.Tensor:  # [B, Hkv, T] bool
        return self.positions != EMPTY

    def held(self) -> torch.Tensor:
        """Entries held per (example, KV head): [B, Hkv]."""
        return self.valid.sum(-1)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, padded: bool = True) -> None:
        """Write new entries in place after each row's held ones. keys/values [B, Hkv, q, D]; positions [B, q]
        (EMPTY for padding).

        ``padded``: whether ``positions`` may hold EMPTY (the caller knows it from the batch layout). With no
        empty slot and no padding every row holds T entries, and the step goes to slots [T, T + q) as a slice.
        """
        batch, heads, q_len, _ = keys.shape
        if self.holes:
            self.keep(self.valid)
            self.holes = False
        start = self.length
        if "keys" not in self.buffers:
            self._allocate(max(self.reserved, start + q_len), keys, values)
        elif start + q_len > self.capacity:
            self._allocate(max(self.reserved, start + q_len, int(self.capacity * GROWTH)))
        new_positions = positions.to(torch.int32)[:, None, :].expand(batch, heads, q_len)
        uniform = not (self.may_have_empty or padded)
        self.may_have_empty |= padded
        self._view(start + q_len)
        if uniform:
            for name, new in (("keys", keys), ("values", values), ("positions", new_positions)):
                self.buffers[name][:, :, start : start + q_len] = new
            for name in self.stats:
                self.buffers[f"stat:{name}"][:, :, start : start + q_len] = 0
            return
        held = (self.positions[:, :, :start] != EMPTY).sum(-1)  # [B, Hkv]
        valid = positions != EMPTY  # [B, q]: valid tokens first, then the padding, after the held entries
        rank = torch.where(valid, valid.cumsum(-1) - 1, (~valid).cumsum(-1) - 1 + valid.sum(-1, keepdim=True))
        slots = held[:, :, None] + rank[:, None, :]  # [B, Hkv, q]
        self.positions[:, :, start:] = EMPTY  # slots the views now cover may hold stale entries
        self.positions.scatter_(2, slots, new_positions)
        self.keys.scatter_(2, _index(slots, self.keys), keys)
        self.values.scatter_(2, _index(slots, self.values), values)
        for stat in self.stats.values():
            stat.scatter_(2, _index(slots, stat), 0)

    def stat(self, name: str, dtype: torch.dtype = torch.float32, trailing: tuple[int, ...] = ()) -> torch.Tensor:
        """A per-slot statistic [B, Hkv, T, *trailing], created as zeros on first use."""
        if name not in self.stats:
            batch, heads, capacity = self.buffers["positions"].shape
            shape = (batch, heads, capacity, *trailing)
            self.buffers[f"stat:{name}"] = torch.zeros(shape, dtype=dtype, device=self.positions.device)
            self.stats[name] = self.buffers[f"stat:{name}"][:, :, : self.length]
        return self.stats[name]

    def keep(self, keep: torch.Tensor, length: int | None = None, exact: bool = False, aligned: bool = False) -> None:
        """Keep only the slots where ``keep`` [B, Hkv, T] is true (in their current order), compacted in place to
        the front; the rest are free for new entries.

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
        slot = torch.arange(new_length, device=order.device)
        positions = torch.where(slot < counts[..., None], self.positions.gather(2, order), EMPTY)
        gathered = {name: _gather_slots(view, order) for name, view in self._views().items() if name != "positions"}
        self._view(new_length)
        self.positions.copy_(positions)
        for name, view in self._views().items():
            if name != "positions":
                view.copy_(gathered[name])

    def trim(self, length: int) -> None:
        """Stop using the slots from ``length`` on (all empty after a ``keep`` without a known length)."""
        self.untrimmed = None
        if length < self.length:
            self._view(length)

    def drop_from(self, positions: torch.Tensor, length: int) -> None:
        """Drop the entries of the last steps, at ``positions`` [B, q] or later, and stop using the slots from
        ``length`` (the length before them) on. They sit right after each row's held entries."""
        first = torch.where(positions != EMPTY, positions, EMPTY).amin(-1)  # [B]
        self.positions.masked_fill_(self.positions >= first[:, None, None], EMPTY)
        self.trim(length)

    def fit(self, slots: int) -> None:
        """Reallocate the buffers to ``slots`` (at least the slots in use): an engine's phase boundary."""
        self.reserved = slots
        if self.buffers and max(slots, self.length) != self.capacity:
            self._allocate(max(slots, self.length))

    def kv_nbytes(self) -> int:
        """Bytes of the key and value buffers allocated."""
        if "keys" not in self.buffers:
            return 0
        return self.buffers["keys"].nbytes + self.buffers["values"].nbytes

    def side_nbytes(self) -> int:
        """Bytes held beside the KV: positions, per-slot statistics and other policy state of this layer."""
        side = [tensor for name, tensor in self.buffers.items() if name not in ("keys", "values")]
        return sum(tensor.nbytes for tensor in [*side, *self.extra.values()])

    def _views(self) -> dict[str, torch.Tensor]:
        views = {"positions": self.positions, **{f"stat:{name}": stat for name, stat in self.stats.items()}}
        return views if self.keys is None else {**views, "keys": self.keys, "values": self.values}

    def _view(self, length: int) -> None:
        """Point the views at the first ``length`` slots of the buffers."""
        views = {name: buffer[:, :, :length] for name, buffer in self.buffers.items()}
        self.keys, self.values, self.positions = views.get("keys"), views.get("values"), views["positions"]
        self.stats = {name: views[f"stat:{name}"] for name in self.stats}

    def _allocate(self, slots: int, keys: torch.Tensor | None = None, values: torch.Tensor | None = None) -> None:
        """(Re)allocate every buffer with ``slots`` slots, keeping the slots in use (first call: shaped like the
        first ``keys``/``values``)."""
        length = self.length
        if keys is not None:  # the first entries: the cache takes their shape, dtype and device
            batch, heads, _, dim = keys.shape
            self.buffers.setdefault(
                "positions", torch.full((batch, heads, 0), EMPTY, dtype=torch.int32, device=keys.device)
            )
            self.buffers["keys"] = keys.new_empty(batch, heads, 0, dim)
            self.buffers["values"] = values.new_empty(batch, heads, 0, values.shape[-1])
        for name, old in self.buffers.items():
            fill = EMPTY if name == "positions" else 0
            new = old.new_full((*old.shape[:2], slots, *old.shape[3:]), fill)
            new[:, :, :length] = old[:, :, :length]
            self.buffers[name] = new
        self._view(length)


def _index(slots: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``slots`` [B, Hkv, q] as a scatter index for a [B, Hkv, T, ...] tensor."""
    return slots.reshape(*slots.shape, *([1] * (tensor.dim() - 3))).expand(*slots.shape, *tensor.shape[3:])


def _gather_slots(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Gather slots (dim 2) of a [B, Hkv, T, ...] tensor by ``order`` [B, Hkv, T']."""
    return tensor.gather(2, _index(order, tensor))


@dataclass
class KVCache:
    """All layers' caches."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([LayerCache(defer_trim=True) for _ in range(n_layers)])

    def nbytes(self) -> int:
        """Everything allocated: keys, values, positions, statistics and other policy state."""
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
