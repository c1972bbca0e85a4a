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
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kvbench.errors import UserError

    if isinstance(config, str):
        config = OmegaConf.load(CONFIGS / f"{config}.yaml")
    try:
        return instantiate(config, **overrides)
    except InstantiationException as error:  # a constructor's one-line error (a wrapper's unknown scorer)
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise


__all__ = ["build"]
