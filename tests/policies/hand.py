"""Hand-built engine inputs for unit tests on constructed attention rows."""

from __future__ import annotations

import torch

from kvbench.policies.base import Context


def context(seen: int, capacity: int | None = None, group_size: int = 1) -> Context:
    """A decode-step context for one example at ``seen`` tokens, on layer 0 of 1."""
    return Context(
        layer_idx=0,
        n_layers=1,
        phase="decode",
        seen=torch.tensor([seen]),
        prompt_lengths=torch.tensor([seen]),
        capacity=None if capacity is None else torch.tensor([capacity]),
        token_ids=torch.zeros(1, seen, dtype=torch.long),
        group_size=group_size,
    )
