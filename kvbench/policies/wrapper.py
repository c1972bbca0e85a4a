"""Wrappers over a scorer policy (ChunkKV, AdaKV): the scorer scores, the wrapper decides what to keep.

The wrapped scorer is named by its config (``scorer: snapkv``, built from ``configs/policy/<scorer>.yaml``
with ``scorer_params`` on top). It keeps its own observation, scores, protected slots and bookkeeping; the
wrapper replaces only its top-k (``ScorerPolicy.selector``) and says how long the kept layer can be.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbench.cache import LayerCache
from kvbench.errors import UserError
from kvbench.policies.base import Context, Needs, Policy, ScorerPolicy


def scorer_names() -> list[str]:
    """Policy configs whose class is a plain scorer (top-k over a score), the ones a wrapper can take."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from kvbench.policies import CONFIGS

    names = []
    for name in sorted(path.stem for path in CONFIGS.glob("*.yaml")):
        cls = get_class(OmegaConf.load(CONFIGS / f"{name}.yaml")._target_)
        if issubclass(cls, ScorerPolicy) and not issubclass(cls, WrapperPolicy):
            names.append(name)
    return names


def build_scorer(wrapper: str, name: str, params: dict[str, Any]) -> ScorerPolicy:
    """The scorer ``name`` from its config with ``params`` over it (one-line ``UserError`` on bad input)."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from kvbench.policies import CONFIGS, build

    valid = scorer_names()
    if name not in valid:
        raise UserError(f"{wrapper}: unknown scorer '{name}'; valid: {', '.join(valid)}")
    fields = sorted(f.name for f in dataclasses.fields(get_class(OmegaConf.load(CONFIGS / f"{name}.yaml")._target_)))
    for key in params:
        if key not in fields:
            raise UserError(f"unknown key policy.scorer_params.{key}; valid: {', '.join(fields)}")
    inner = build(name, **params)
    if inner.needed().position_shift:
        raise UserError(f"{wrapper}: a scorer with position_shift=true cannot be wrapped (its positions are ranks)")
    return inner


@dataclass
class WrapperPolicy(Policy):
    """Delegates observation, scoring and protected slots to ``scorer``; subclasses write ``choose``."""

    scorer: str = "snapkv"
    scorer_params: dict[str, Any] = field(default_factory=dict)
    # The scorer decides the phase and what the engine hands over (attention rows, queries).
    needs = Needs(
        phase=lambda p: p.inner.needed().phase,
        query_rows=lambda p: p.inner.needed().query_rows,
        decode_rows=lambda p: p.inner.needed().decode_rows,
        queries=lambda p: p.inner.needed().queries,
        decode_queries=lambda p: p.inner.needed().decode_queries,
        reconstruction=lambda p: p.inner.needed().reconstruction,
    )

    def __post_init__(self) -> None:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(self.scorer_params, DictConfig):
            self.scorer_params = OmegaConf.to_container(self.scorer_params, resolve=True)
        self.inner = build_scorer(self.name, self.scorer, dict(self.scorer_params))
        self.inner.selector = self.choose

    def choose(
        self, layer: LayerCache, scores: torch.Tensor, capacity: torch.Tensor, protected: torch.Tensor | None
    ) -> torch.Tensor:
        """Keep mask [B, Hkv, T] of ``layer`` from the scorer's ``scores`` [B, Hkv, T] under ``capacity`` [B]
        entries per (example, KV head), ``protected`` slots [B, Hkv, T] (or None) first."""
        raise NotImplementedError

    def bind(self, tokenizer: Any) -> None:
        self.inner.bind(tokenizer)

    def observe(self, layer: LayerCache, probs: torch.Tensor, query_positions: torch.Tensor, ctx: Context) -> None:
        self.inner.observe(layer, probs, query_positions, ctx)

    def observe_queries(
        self, layer: LayerCache, queries: torch.Tensor, query_positions: torch.Tensor, ctx: Context
    ) -> None:
        self.inner.observe_queries(layer, queries, query_positions, ctx)

    def reconstruction_ids(self, context: list[int], start: int, end: int) -> list[int]:
        return self.inner.reconstruction_ids(context, start, end)

    def select(self, layer: LayerCache, ctx: Context) -> torch.Tensor | None:
        return self.inner.select(layer, ctx)

    def layer_capacity(self, capacity: torch.Tensor, ctx: Context) -> torch.Tensor:
        return self.inner.layer_capacity(capacity, ctx)

    def protected_windows(self, prompt_tokens: int, capacity: int | None) -> list[tuple[int, int]]:
        return self.inner.protected_windows(prompt_tokens, capacity)

    def params(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        return {**fields, "scorer_params": {**dataclasses.asdict(self.inner), **self.scorer_params}}
