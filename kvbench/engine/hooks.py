"""The only module that touches transformers' attention: ``with attach(model, engine):``, and
``with capture(model, layers, on_layer):`` (plain causal attention handing each layer's q, k, v, o to a callback:
LESS training).

kvbench registers its own attention function and calls the model with ``use_cache=False``, so transformers
keeps no cache at all: each layer's attention receives the new (post-RoPE) queries, keys and values and the
step (``kvbench_step=``, passed through the model's forward) and hands them to ``Engine.attend``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from kvbench.engine.engine import Engine
from kvbench.errors import UserError

ATTENTION_NAME = "kvbench"
CAPTURE_NAME = "kvbench_capture"
OnLayer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


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


@contextlib.contextmanager
def capture(model: torch.nn.Module, layers: list[int], on_layer: OnLayer) -> Iterator[None]:
    """Run ``model`` with plain causal attention (no cache, no padding) and, for each layer in ``layers``, call
    ``on_layer(layer_idx, q, k, v, o)`` once per forward pass: its post-RoPE q [B, H, N, D], k/v [B, Hkv, N, D]
    and the attention block's output o [B, N, C] (after o_proj), as the model computed them."""
    selected = frozenset(layers)
    pending: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if module.layer_idx in selected:
            pending[module.layer_idx] = (query, key, value)
        groups = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=groups > 1)
        return out.transpose(1, 2).contiguous(), None

    def keep_output(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        query, key, value = pending.pop(module.layer_idx)
        on_layer(module.layer_idx, query, key, value, output[0])

    modules = [m for m in attention_modules(model) if m.layer_idx in selected]
    handles = [m.register_forward_hook(keep_output) for m in modules]
    try:
        with _routed(model, CAPTURE_NAME, attention):
            yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["ATTENTION_NAME", "attach", "attention_modules", "capture"]
