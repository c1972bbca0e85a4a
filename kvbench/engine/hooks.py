"""The only module that touches transformers' attention: ``with attach(model, engine):``.

kvbench registers its own attention function and calls the model with ``use_cache=False``, so transformers
keeps no cache at all: each layer's attention receives the new (post-RoPE) queries, keys and values and the
step (``kvbench_step=``, passed through the model's forward) and hands them to ``Engine.attend``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvbench.engine.engine import Engine
from kvbench.errors import UserError

ATTENTION_NAME = "kvbench"


def _kvbench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-interface signature; the mask argument is unused (positions decide)."""
    return module.kvbench_engine.attend(module.layer_idx, query, key, value, scaling, kwargs["kvbench_step"]), None


def _no_mask(*args, **kwargs) -> None:
    return None


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention layers (the modules transformers calls the attention interface from)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]


@contextlib.contextmanager
def _routed(model: torch.nn.Module, name: str, function: Callable[..., Any]) -> Iterator[None]:
    """Register ``function`` as the attention implementation ``name`` (with no mask building) and switch
    ``model`` to it for the block; the model's previous implementation is restored after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, _no_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def attach(model: torch.nn.Module, engine: Engine) -> Iterator[Engine]:
    """Route every attention layer of ``model`` through ``engine`` for the duration of the block."""
    modules = attention_modules(model)
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if engine.needs.position_shift and (rotary is None or getattr(rotary, "attention_scaling", 1.0) != 1.0):
        raise UserError("position_shift needs plain RoPE (a rotary_emb without attention scaling)")
    engine.inv_freq = None if rotary is None else rotary.inv_freq
    for module in modules:
        module.kvbench_engine = engine
    try:
        with _routed(model, ATTENTION_NAME, _kvbench_attention):
            yield engine
    finally:
        for module in modules:
            del module.kvbench_engine


__all__ = ["ATTENTION_NAME", "attach", "attention_modules"]
