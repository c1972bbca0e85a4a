"""Calibrations a policy needs from the loaded model before it runs (``Needs.calibration`` names one).

``prepare(policy, model, tokenizer)`` is the one entry: the runner calls it after loading the model, the library
API and the tests before building an engine. A policy that declares no calibration is left as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kvbench.calibration import duoattention
from kvbench.errors import UserError
from kvbench.policies.base import Policy

PROCEDURES = {"duoattention": duoattention.calibrate}


def prepare(
    policy: Policy, model: torch.nn.Module, tokenizer: Any, data_dir: Path | None = None, store: bool = True
) -> None:
    """Run the calibration ``policy`` declares on ``model``, reusing its cache (``store=False``: compute it in
    memory and write nothing); ``data_dir`` holds the text calibration prompts may use."""
    name = policy.needed().calibration
    if name is None:
        return
    if name not in PROCEDURES:
        raise UserError(f"unknown calibration '{name}'; valid: {', '.join(PROCEDURES)}")
    PROCEDURES[name](policy, model, tokenizer, data_dir, store)


__all__ = ["PROCEDURES", "prepare"]
