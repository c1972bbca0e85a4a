"""Shared fixtures: the real offline model, the tiny random GQA Llama, composed configs, the data dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kvbench.config import CONFIG_DIR
from kvbench.models import load, model_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(os.environ.get("KVBENCH_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 on CPU."""
    return load(model_spec("smollm2_135m"), "cpu", torch.float32)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the 4-layer random GQA Llama."""
    return load(model_spec("tiny_random_llama"), "cpu", torch.float32)


@pytest.fixture
def make_config(tmp_path, data_dir):
    """Compose ``kvbench/configs/config.yaml`` with overrides, writing into a temporary results dir."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(
                "config", overrides=[f"results_dir={tmp_path / 'results'}", f"data_dir={data_dir}", *overrides]
            )

    return _compose
