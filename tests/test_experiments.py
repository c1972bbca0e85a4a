"""Every ``kvbench/configs/experiment/*.yaml`` composes at every point of its sweep grid and builds its policy and
budget (no model is loaded)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from kvbench.config import CONFIG_DIR
from kvbench.policies import build
from kvbench.policies.base import Budget

EXPERIMENTS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))


def grid(name: str) -> list[list[str]]:
    """The override lists of every sweep point of ``+experiment=<name>`` (sweep_id left out)."""
    cfg = compose("config", overrides=[f"+experiment={name}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    overrides = [f"{key}={value}" for key, value in params.items() if key != "sweep_id"]
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [point for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds_its_policies(name, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        points = grid(name)
        assert points, name
        for point in points:
            cfg = compose("config", overrides=[f"+experiment={name}", f"results_dir={tmp_path}", *point])
            budget = Budget.from_config(cfg.budget, cfg.get("budget_tokens"))
            policy = build(cfg.get("policy"))
            assert not (policy.needed().budget == "required" and budget.kind == "none"), (name, point)
            policy.check_budget(budget)  # what the runner checks before any model loads
            assert cfg.model.name and cfg.task.name, (name, point)
