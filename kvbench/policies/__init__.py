"""KV-cache policies: one dataclass per file, configured by ``kvbench/configs/policy/<name>.yaml``.

``build`` is the one way to make a policy from its configuration; the contract is in ``base.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvbench.policies.base import Policy

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "policy"


def build(config: Mapping[str, Any] | str | None = None, **overrides: Any) -> Policy:
    """The policy a ``configs/policy/*.yaml`` node describes (``_target_`` + fields), with ``overrides``.

    ``config`` is the node (as composed, interpolations resolved against its parent), the name of a packaged
    YAML (``"snapkv"``), or None for the full cache.
    """
    if config is None:
        from kvbench.policies.full import FullCache

        return FullCache(**overrides)
    from omegaconf import OmegaConf

    from kvbench.errors import instantiate

    if isinstance(config, str):
        config = OmegaConf.load(CONFIGS / f"{config}.yaml")
    return instantiate(config, **overrides)


__all__ = ["build"]
