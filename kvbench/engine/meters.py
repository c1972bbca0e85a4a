"""What a batch's run measured: peak bytes held, the kept fraction, and (diagnostics) the attention mass the
held keys retain. Byte meters read only host metadata (shapes); the kept fraction stays on the device until read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvbench.cache import EMPTY, KVCache, LayerCache
from kvbench.engine.kernels import attention_probs


@dataclass
class Meters:
    """Per-batch measurements, updated by the engine after every layer and step."""

    n_layers: int
    group_size: int
    diagnostics: bool = False
    diagnostics_every: int = 16  # with diagnostics: the attention mass is measured every this many decode steps
    peak_nbytes: int = 0  # keys, values and side state (positions, statistics, policy state)
    peak_kv_nbytes: int = 0  # keys and values only
    peak_decode_nbytes: int = 0  # everything held, during decode (the compressed cache while generating)
    held_sum: torch.Tensor | None = None  # [B] entries held, summed over layers, heads and steps (on device)
    full_sum: torch.Tensor | None = None  # [B] entries a full cache would hold, same sums (host)
    mass_sum: torch.Tensor | None = None  # [L, B, Hkv] attention mass retained, summed over decode steps
    mass_steps: int = 0
    decode_steps: int = 0
    shadow_keys: list[LayerCache] = field(default_factory=list)
    _layer_nbytes: list[int] = field(default_factory=list)
    _layer_kv_nbytes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._layer_nbytes = [0] * self.n_layers
        self._layer_kv_nbytes = [0] * self.n_layers
        if self.diagnostics:
            self.shadow_keys = [LayerCache() for _ in range(self.n_layers)]

    def bytes(self, layer: LayerCache, layer_idx: int, decode: bool) -> None:
        """Update the byte peaks after a change of one layer (host metadata only: shapes, no tensor read)."""
        self._layer_kv_nbytes[layer_idx] = layer.kv_nbytes()
        self._layer_nbytes[layer_idx] = self._layer_kv_nbytes[layer_idx] + layer.side_nbytes()
        total = sum(self._layer_nbytes)
        self.peak_nbytes = max(self.peak_nbytes, total)
        self.peak_kv_nbytes = max(self.peak_kv_nbytes, sum(self._layer_kv_nbytes))
        if decode:
            self.peak_decode_nbytes = max(self.peak_decode_nbytes, total)

    def count_held(self, cache: KVCache, seen: list[int]) -> None:
        """Accumulate held vs full-cache entries after a step (end of prefill, every decode step)."""
        held = cache.held().sum(dim=(0, 2)).double()  # [B], stays on the device
        full = torch.tensor(seen, dtype=torch.float64) * self.n_layers * cache.layers[0].keys.shape[1]
        self.held_sum = held if self.held_sum is None else self.held_sum + held
        self.full_sum = full if self.full_sum is None else self.full_sum + full

    def kept_fraction(self) -> torch.Tensor:
        """Achieved kept fraction per example [B]: held entries / full-cache entries, over all steps."""
        return self.held_sum.cpu() / self.full_sum

    @staticmethod
    def final_kept_per_head(cache: KVCache, seen: torch.Tensor) -> torch.Tensor:
        """Kept fraction at the end, per (layer, example, KV head): [L, B, Hkv]; ``seen`` [B] tokens seen."""
        return cache.held().double().cpu() / seen.double().cpu()[None, :, None]

    def attention_mass(self) -> torch.Tensor | None:
        """Mean share of the full-history attention on held keys over decode steps and layers [B] (diagnostics)."""
        if self.mass_sum is None or not self.mass_steps:
            return None
        return self.mass_sum.cpu().mean(dim=(0, 2)) / self.mass_steps

    def full_nbytes(self, cache: KVCache, longest: int) -> int:
        """Bytes of keys and values a full cache would hold for this batch at ``longest`` tokens."""
        layer = cache.layers[0]
        batch, heads, _, dim = layer.keys.shape
        return 2 * self.n_layers * batch * heads * longest * dim * layer.keys.element_size()

    def track_mass(
        self,
        held: torch.Tensor,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        positions: torch.Tensor,
        step: tuple[str, list[int] | None, bool],
        scale: float,
    ) -> None:
        """Diagnostics: share of the full-history attention row that falls on slots still held (decode).

        ``held``: the layer's held positions [B, Hkv, T']; ``positions`` [B, q] of the new keys ``key``;
        ``step``: (phase, host tokens seen, whether the step has padding)."""
        phase, seen, padded = step
        shadow = self.shadow_keys[layer_idx]
        shadow.append(key, key[..., :1], positions, padded=padded)
        if phase != "decode" or self.decode_steps % self.diagnostics_every:
            return
        probs = attention_probs(query, shadow, positions, scale, self.group_size)  # [B, H, 1, T]
        marks = torch.zeros(*held.shape[:2], max(seen) + 1, device=held.device)
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
