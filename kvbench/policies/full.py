"""The full cache: nothing is evicted. The reference every policy is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from kvbench.policies.base import Needs, Policy


@dataclass
class FullCache(Policy):
    """Keep every key and value. Phase: none. Budget: ignored (1.0)."""

    needs = Needs(phase="prefill", budget="full")
