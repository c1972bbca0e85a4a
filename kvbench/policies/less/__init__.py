"""LESS, Low-rank Embedding Sidekick with Sparse policy (Dong et al. 2024, arXiv 2402.09398): a sparse
policy whose evicted KV pairs are folded into a learned constant-size state that still takes part in attention.

The package is a leaf: the policy (here), its kernels' I/O (``kernels.py``); training is ``kvbench.training.less``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kvbench.cache import LayerCache
from kvbench.engine.kernels import ROW_BLOCK, visible
from kvbench.errors import UserError
from kvbench.policies.base import Context, Needs, Policy
from kvbench.policies.h2o import H2OPolicy
from kvbench.policies.less.kernels import BASES, TRAIN_HINT, Kernels, load_kernels
from kvbench.policies.streaming_llm import StreamingLLMPolicy


def combine(
    output: torch.Tensor, lse: torch.Tensor, phi: torch.Tensor, state_h: torch.Tensor, state_z: torch.Tensor
) -> torch.Tensor:
    """The combined attention (phi H + sum_j e_j v_j) / (phi z + sum_j e_j), divided through by sum_j e_j.

    output [B, H, q, D]: softmax attention over the held keys; lse [B, H, q]: log sum_j e_j over them;
    phi [B, H, q, R]; state_h [B, H, R, D]; state_z [B, H, R] (already repeated to the query heads).
    With a zero state this returns ``output`` bit for bit.
    """
    inverse = torch.exp(-lse)[..., None]  # 1 / sum_j e_j
    numerator = output + torch.matmul(phi, state_h) * inverse
    denominator = 1 + torch.matmul(phi, state_z[..., None]) * inverse
    return numerator / denominator


@dataclass
class LESSPolicy(Policy):
    """A sparse policy (H2O, or Lambda = sinks + recent) plus, per layer and KV head, a learned state
    H [R, D], z [R] that absorbs every evicted pair (z += psi(k), H += psi(k)^T v) and joins attention as
    out = (phi(q) H + sum_j e_j v_j) / (phi(q) z + sum_j e_j) over the held keys j (§3; methods.md §2).

    Phase: as the base (prompt attended in full, the first eviction folds all evicted prompt tokens at once,
    the combined formula from then on, as the official generative code). Budget: the base's capacity,
    floor(budget x tokens seen) (deviation: the paper's ratios are of max_position_embeddings, e.g. 5% H2O =
    0.025 + 0.025 of 4096); the state is held in ``layer.extra`` in fp32 and counted in kv_bytes:
    R (D + 1) floats per KV head, about R/2 token-equivalents against an fp32 cache (R against bf16).
    Kernels are trained per model, base and budget by ``scripts/train_less.py``; ``kernels`` is the directory
    holding ``kernels.safetensors`` + ``manifest.json``, given by the config (``configs/policy/less.yaml``:
    under ``${KVBENCH_CACHE}``, default ``~/.cache/kvbench``; relative paths are from the working directory).
    GQA (deviation; the paper is MHA/MQA): the state is per KV head, phi per query head of the group.
    """

    base: str = "h2o"
    recent_fraction: float = 0.5  # H2O base: share of the capacity kept for recent tokens
    n_sink: int = 4  # Lambda base: fixed initial tokens
    rank: int = 8
    kernels: str | None = None
    model: str | None = None  # checked against the manifest when given (the YAML passes ${model.name})
    # The base decides which attention rows are needed and when to evict.
    needs = Needs(
        phase=lambda p: p._sparse.needed().phase,
        query_rows=lambda p: p._sparse.needed().query_rows,
        decode_rows=lambda p: p._sparse.needed().decode_rows,
    )

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise UserError(f"less: base must be one of {', '.join(BASES)}, not '{self.base}'")
        if self.base == "h2o":
            self._sparse: Policy = H2OPolicy(recent_fraction=self.recent_fraction)
        else:
            self._sparse = StreamingLLMPolicy(n_sink=self.n_sink)
        self._layers: list[Kernels] | None = None
        self.manifest: dict[str, Any] = {}

    def load(self) -> LESSPolicy:
        """Read and check the kernels (a one-line ``UserError`` when missing or trained for something else)."""
        if self._layers is None:
            self._layers, self.manifest = load_kernels(self.kernels, self.base, self.rank, self.model)
        return self

    def bind(self, tokenizer: Any) -> None:
        # The runner calls this once before the first example: a missing kernel fails there, in one line
        # (raised from __post_init__ it would reach the user wrapped in Hydra's InstantiationException).
        self.load()

    def params(self) -> dict[str, Any]:
        return {**super().params(), "trained_budget": self.manifest.get("budget")}

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        return self._sparse.protected_windows(prompt_tokens, capacity)

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        self._sparse.observe(layer, probs, query_positions, ctx)

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        return self._sparse.select(layer, ctx)

    def kernels_of(self, layer_idx: int, device: torch.device) -> Kernels:
        self.load()
        if layer_idx >= len(self._layers):
            raise UserError(f"less: the kernels cover {len(self._layers)} layers, the model has more")
        kernels = self._layers[layer_idx]
        if kernels.q1.device != device:
            kernels = self._layers[layer_idx] = kernels.to(device)
        return kernels

    def before_keep(self, layer: LayerCache, keep: torch.Tensor, ctx: Context) -> None:
        self.fold(layer, layer.valid & ~keep, ctx)

    def kept_length(self, layer: LayerCache, ctx: Context) -> tuple[int | None, bool]:
        return self._sparse.kept_length(layer, ctx)

    @torch.no_grad()
    def fold(self, layer: LayerCache, gone: torch.Tensor, ctx: Context) -> None:
        """Add the evicted pairs (``gone`` [B, Hkv, T]) to the layer's state: z += psi(k), H += psi(k)^T v."""
        counts = gone.sum(-1)  # [B, Hkv]
        width = layer.length  # a host bound on the evicted count (no device read)
        order = torch.sort((~gone).to(torch.int8), dim=-1, stable=True).indices[..., :width]  # evicted first
        index = order[..., None].expand(*order.shape, layer.keys.shape[-1])
        keys = layer.keys.gather(2, index).float()  # [B, Hkv, E, D]
        values = layer.values.gather(2, index).float()
        real = (torch.arange(width, device=order.device) < counts[..., None]).float()  # [B, Hkv, E]
        kernels = self.kernels_of(ctx.layer_idx, keys.device)
        features = kernels.psi(keys) * real[..., None]  # [B, Hkv, E, R]
        state_h, state_z = self.state(layer)
        state_h += features.transpose(-1, -2) @ values
        state_z += features.sum(2)

    def state(self, layer: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's (H [B, Hkv, R, D], z [B, Hkv, R]) in fp32, created as zeros on first use."""
        if "less_h" not in layer.extra:
            batch, heads, _, dim = layer.keys.shape
            layer.extra["less_h"] = layer.keys.new_zeros(batch, heads, self.rank, dim, dtype=torch.float32)
            layer.extra["less_z"] = layer.keys.new_zeros(batch, heads, self.rank, dtype=torch.float32)
        return layer.extra["less_h"], layer.extra["less_z"]

    @torch.no_grad()
    def attention_output(
        self, layer: LayerCache, query: torch.Tensor, output: torch.Tensor, scale: float, ctx: Context
    ) -> torch.Tensor:
        if "less_h" not in layer.extra:
            return output  # nothing evicted yet: the state is zero and the output exact
        state_h, state_z = self.state(layer)
        group = ctx.group_size
        state_h = state_h.repeat_interleave(group, dim=1)  # [B, H, R, D]
        state_z = state_z.repeat_interleave(group, dim=1)  # [B, H, R]
        kernels = self.kernels_of(ctx.layer_idx, query.device)
        keys = layer.keys.repeat_interleave(group, dim=1) if group > 1 else layer.keys
        # The new queries' positions: the engine appends their keys (same for every head) before attending.
        query_positions = layer.positions[:, 0, -query.shape[2] :]  # [B, q]
        blocks = []
        for start in range(0, query.shape[2], ROW_BLOCK):
            rows = slice(start, min(start + ROW_BLOCK, query.shape[2]))
            q = query[:, :, rows].float()
            logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scale  # [B, H, q, T]
            mask = visible(layer.positions, query_positions[:, rows], group, layer.heads_aligned)
            lse = torch.logsumexp(logits.masked_fill(~mask, float("-inf")), dim=-1)  # [B, H, q]
            blocks.append(combine(output[:, :, rows].float(), lse, kernels.phi(q), state_h, state_z))
        return torch.cat(blocks, dim=2).to(output.dtype)


__all__ = ["BASES", "TRAIN_HINT", "Kernels", "LESSPolicy", "combine", "load_kernels"]
