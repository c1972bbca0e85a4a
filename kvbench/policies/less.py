"""LESS, Low-rank Embedding Sidekick with Sparse policy (Dong et al. 2024, arXiv 2402.09398): a sparse
policy whose evicted KV pairs are folded into a learned constant-size state that still takes part in attention."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvbench.cache import LayerCache
from kvbench.config import CONFIG_DIR
from kvbench.engine.kernels import ROW_BLOCK, visible
from kvbench.errors import UserError
from kvbench.policies.base import Context, Needs, Policy
from kvbench.policies.h2o import H2OPolicy
from kvbench.policies.streaming_llm import StreamingLLMPolicy

BASES = ("h2o", "lambda")
TRAIN_HINT = "train them with `python scripts/train_less.py --model <name> --base <base> --budget <b>`"


class Kernels(torch.nn.Module):
    """The feature maps of one layer (methods.md §2(a)): phi per query head, psi per KV head, rank R.

    phi(q) = |gelu(gelu(q W1) W2)|;  psi(k): u = |s1| * gelu(gelu(k W1) W2), u = u + (u Wint) * s2, psi = |u|.
    No biases (the spec's formulas have none). Dropout acts on the first layer's output while training.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, rank: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = dropout

        def linear(heads: int, fan_in: int, fan_out: int) -> torch.nn.Parameter:
            bound = 1 / math.sqrt(fan_in)  # nn.Linear's default init
            return torch.nn.Parameter(torch.empty(heads, fan_in, fan_out).uniform_(-bound, bound))

        self.q1, self.q2 = linear(n_heads, head_dim, hidden), linear(n_heads, hidden, rank)
        self.k1, self.k2 = linear(n_kv_heads, head_dim, hidden), linear(n_kv_heads, hidden, rank)
        self.k_int = linear(n_kv_heads, rank, rank)
        self.s1 = torch.nn.Parameter(torch.full((n_kv_heads, rank), 1e-4))
        self.s2 = torch.nn.Parameter(torch.full((n_kv_heads, rank), 1e-4))

    def _mlp(self, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(torch.einsum("bhnd,hde->bhne", x, w1))
        hidden = F.dropout(hidden, self.dropout, self.training)
        return F.gelu(torch.einsum("bhne,her->bhnr", hidden, w2))

    def phi(self, queries: torch.Tensor) -> torch.Tensor:
        """queries [B, H, q, D] (post-RoPE) -> features [B, H, q, R], non-negative."""
        return self._mlp(queries, self.q1, self.q2).abs()

    def psi(self, keys: torch.Tensor) -> torch.Tensor:
        """keys [B, Hkv, T, D] (post-RoPE) -> features [B, Hkv, T, R], non-negative."""
        u = self.s1.abs()[None, :, None] * self._mlp(keys, self.k1, self.k2)
        u = u + torch.einsum("bhnr,hrs->bhns", u, self.k_int) * self.s2[None, :, None]
        return u.abs()


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


def default_kernels_dir(model: str, base: str, budget: float) -> Path:
    """Where ``scripts/train_less.py`` writes by default (``kvbench/configs/policy/less.yaml`` points here)."""
    from kvbench.models import cache_root

    return cache_root() / "less" / f"{model}_{base}_{budget:g}"


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
    holding ``kernels.safetensors`` + ``manifest.json`` (relative paths are from the repository root).
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


def resolve(path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else CONFIG_DIR.parent.parent / candidate


def load_kernels(kernels: str | None, base: str, rank: int, model: str | None) -> tuple[list[Kernels], dict[str, Any]]:
    """Read ``kernels.safetensors`` + ``manifest.json`` from the directory ``kernels`` and check them."""
    if kernels is None:
        raise UserError(f"less needs trained kernels: set policy.kernels=<dir>, or {TRAIN_HINT}")
    root = resolve(kernels)
    if not (root / "manifest.json").is_file() or not (root / "kernels.safetensors").is_file():
        raise UserError(f"less: no kernels.safetensors + manifest.json in {root}; {TRAIN_HINT}")
    manifest = json.loads((root / "manifest.json").read_text())
    for key, wanted in (("base", base), ("rank", rank), ("model", model)):
        if wanted is not None and manifest.get(key) != wanted:
            raise UserError(f"less: kernels in {root} were trained for {key}={manifest.get(key)}, not {wanted}")
    from safetensors.torch import load_file

    tensors = load_file(str(root / "kernels.safetensors"))
    layers = []
    for index in range(int(manifest["n_layers"])):
        layer = Kernels(
            manifest["n_heads"], manifest["n_kv_heads"], manifest["head_dim"], manifest["rank"], manifest["hidden"]
        )
        layer.load_state_dict({name: tensors[f"layers.{index}.{name}"] for name, _ in layer.named_parameters()})
        layers.append(layer.eval().requires_grad_(False))
    return layers, manifest
