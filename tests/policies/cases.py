"""One line per policy: the config name and the tokens it promises to keep (checked by the matrix tests).

``protected(policy, positions, seen, capacity)`` returns the positions [B, Hkv, T] bool mask that must survive
an eviction (given the positions held before it), or None when the policy promises nothing.
"""

from __future__ import annotations

import torch


def _sinks(policy, positions, seen, capacity):
    return positions < min(policy.n_sink, int(capacity.min()))


def _recent(width):
    def keep(policy, positions, seen, capacity):
        window = width(policy, capacity)
        return (positions >= (seen - window)[:, None, None]) & (positions < seen[:, None, None])

    return keep


POLICIES = {
    "random": None,
    "knorm": None,
    "streaming_llm": _sinks,
    "h2o": _recent(lambda p, c: torch.floor(c * p.recent_fraction).long()),
    "tova": None,
    "snapkv": _recent(lambda p, c: torch.where(c >= p.window, p.window, 0)),
    "pyramidkv": None,
}
