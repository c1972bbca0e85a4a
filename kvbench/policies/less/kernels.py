"""LESS kernels I/O (Dong et al. 2024, arXiv 2402.09398; methods.md §2(a)): the per-layer feature maps phi, psi and
the ``kernels.safetensors`` + ``manifest.json`` directory that ``scripts/train_less.py`` writes and the policy reads."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kvbench.errors import UserError

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


def resolve(path: str) -> Path:
    """The kernels directory named by the config: ``~`` expanded, relative paths from the working directory."""
    return Path(path).expanduser()


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
