"""Every ``kvbench/configs/experiment/*.yaml`` (and ``smollm2/*.yaml``) composes at every point of its sweep grid and
builds its policy, budget and task (no model is loaded); the smollm2/ presets compose to the configs of the
commands scripts/sweep_smollm2.sh ran before them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kvbench.config import CONFIG_DIR
from kvbench.policies import build
from kvbench.policies.base import Budget

EXPERIMENTS = sorted(
    str(path.relative_to(CONFIG_DIR / "experiment").with_suffix(""))
    for pattern in ("*.yaml", "smollm2/*.yaml")
    for path in (CONFIG_DIR / "experiment").glob(pattern)
)


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
            assert cfg.model.name and all(task.name for task in instantiate(cfg.task).subtasks()), (name, point)


# The commands scripts/sweep_smollm2.sh ran before its steps became the smollm2/ presets (its `kv -m ...` lines,
# variables expanded; {less} is ${KVBENCH_CACHE:-$HOME/.cache/kvbench}/less): each preset's points compose to
# exactly the configs of its old command, so a rerun resumes the committed rows instead of recomputing them.
SYN, SYN6 = (
    "batch_size=3 results_dir=results/sweeps/synthetic_smollm2",
    "results_dir=results/sweeps/synthetic6k_smollm2",
)
SIX, PN, LB = (
    f"task=passkey,needle task.lengths=[6144] batch_size=3 {SYN6}",
    "task=passkey,needle",
    "limit=5 batch_size=5",
)
LB = f"{LB} results_dir=results/sweeps/longbench_smollm2"
LB3 = f"task=longbench/multi_news,longbench/multifieldqa_zh,longbench/passage_retrieval_zh {LB}"
ALL = "random,knorm,streaming_llm,h2o,scissorhands,tova,snapkv,pyramidkv,corm"
FIXED = "+policy=fixed_capacity policy.rule=sliding_window,replace_lowest,merge budget_tokens=256,512,1024"
DEPTHS = "task.depths=[0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.7,0.75,0.85,0.95]"
DENSE = f"results_dir=results/sweeps/less_dense_smollm2 batch_size=3 {DEPTHS}"
L8K = "+policy=less policy.base=lambda policy.kernels={less}/smollm2_135m_lambda_0.3_w12x8192e10 budget=0.3"
H2K = "+policy=less policy.kernels={less}/smollm2_135m_h2o_0.1_w12x2048e10 budget=0.1 task.lengths=[2048]"
DENSE_POLICIES = ("", "+policy=streaming_llm budget=0.3", L8K, "+policy=h2o budget=0.1 task.lengths=[2048]", H2K)
W2048 = "+policy=less budget=0.1 policy.kernels={less}/smollm2_135m_h2o_0.1_w12x2048e4"
OLD_COMMANDS = {
    "synthetic_full": [f"{PN} {SYN}"],
    "synthetic_baselines": [
        f"+policy=random,knorm,streaming_llm,h2o,scissorhands,tova,snapkv,pyramidkv budget=0.1,0.3,0.5 {PN} {SYN}"
    ],
    "synthetic_corm": [f"+policy=corm budget=0.1,0.3,0.5 {PN} {SYN}"],
    "synthetic_fixed": [f"{FIXED} {PN} {SYN}"],
    "synthetic_corm_native": [f"+policy=corm {PN} {SYN}"],
    "synthetic_fastgen": [f"+policy=fastgen policy.recovery=0.91,0.93,0.95,0.98 {PN} {SYN}"],
    "synthetic_less": [f"+policy=less budget=0.1 {PN} {SYN}"],
    "synthetic6k_table": [f"+policy=h2o,streaming_llm,snapkv,tova,corm budget={b} {SIX}" for b in ("0.3", "0.1,0.5")],
    "synthetic6k_fixed": [f"{FIXED} {SIX}"],
    "synthetic6k_full": [SIX],
    "synthetic6k_less": [f"+policy=less budget=0.1 {SIX}"],
    "synthetic6k_corm_native": [f"+policy=corm {SIX}"],
    "synthetic6k_fastgen": [f"+policy=fastgen policy.recovery={t} {SIX}" for t in ("0.95", "0.91,0.93,0.98")],
    "longbench_full": [LB3],
    "longbench_snapkv": [f"+policy=snapkv budget=0.3 {LB3}"],
    **{
        name.format(k=k): [command.format(k=k, length=k * 1024) for command in commands]
        for k in (2, 4)
        for name, commands in {
            "ruler{k}k_full": [
                "task=ruler task.lengths=[{length}] limit=1 results_dir=results/sweeps/ruler{k}k_smollm2"
            ],
            "ruler{k}k_fastgen": [
                "+policy=fastgen task=ruler task.lengths=[{length}] limit=1 "
                "results_dir=results/sweeps/ruler{k}k_smollm2"
            ],
            "ruler{k}k_policies": [
                f"+policy={ALL} budget={b} task=ruler task.lengths=[{{length}}] limit=1 "
                "results_dir=results/sweeps/ruler{k}k_smollm2"
                for b in ("0.3", "0.1,0.5")
            ],
            "ruler{k}k_fixed": [
                f"{FIXED} task=ruler task.lengths=[{{length}}] limit=1 results_dir=results/sweeps/ruler{{k}}k_smollm2"
            ],
        }.items()
    },
    "ruler4k_snapkv_streaming": [
        "+policy=snapkv,streaming_llm budget=0.3 task=ruler limit=1 results_dir=results/sweeps/ruler4k_smollm2"
    ],
    "less_h2o_budgets": [
        f"+policy=less budget={b} policy.kernels={{less}}/smollm2_135m_h2o_{b} {PN} {SYN}" for b in ("0.3", "0.5")
    ],  # fmt: skip
    "less_h2o_budgets_6k": [
        f"+policy=less budget={b} policy.kernels={{less}}/smollm2_135m_h2o_{b} {SIX}" for b in ("0.3", "0.5")
    ],  # fmt: skip
    "less_lambda": [
        "+policy=less policy.base=lambda policy.kernels={less}/smollm2_135m_lambda_0.3 budget=0.3 "
        f"{PN} results_dir=results/sweeps/synthetic_smollm2"
    ],
    "less_lambda_w24x1024e6": [
        "+policy=less policy.base=lambda policy.kernels={less}/smollm2_135m_lambda_0.3_w24x1024e6 budget=0.3 "
        f"{PN} results_dir=results/sweeps/synthetic_smollm2"
    ],
    "less_longbench": [f"+policy=h2o,less budget=0.1 task=longbench/multi_news {LB}"],
    "less_longbench_w2048": [f"{W2048} task=longbench/multi_news {LB}"],
    "less_w2048": [f"{W2048} {PN} {SYN}"],
    "less_lambda_8k": [f"{L8K} {PN} {SYN}"],
    "less_lambda_8k_6k": [f"{L8K} {SIX}"],
    "dense_passkey": [f"{p} task=passkey task.name=passkey_dense task.n_per_cell=3 {DENSE}" for p in DENSE_POLICIES],
    "dense_needle": [f"{p} task=needle task.name=needle_dense {DENSE}" for p in DENSE_POLICIES],
}


def composed(overrides: list[str]) -> str:
    """The resolved config of one sweep point, as canonical JSON."""
    cfg = compose("config", overrides=overrides)
    return json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)


def test_every_smollm2_preset_is_listed():
    assert sorted(OLD_COMMANDS) == sorted(path.stem for path in (CONFIG_DIR / "experiment" / "smollm2").glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(OLD_COMMANDS))
def test_smollm2_preset_points_equal_the_old_script_commands(name, monkeypatch):
    monkeypatch.delenv("KVBENCH_CACHE", raising=False)
    less = str(Path.home() / ".cache" / "kvbench" / "less")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        preset = sorted(composed([f"+experiment=smollm2/{name}", *point]) for point in grid(f"smollm2/{name}"))
        old = []
        for command in OLD_COMMANDS[name]:
            parsed = OverridesParser.create().parse_overrides(command.replace("{less}", less).split())
            old += [composed(point) for batch in BasicSweeper.split_arguments(parsed, None) for point in batch]
    assert len(preset) == len(set(preset)) and preset == sorted(old)


def test_the_sweep_script_runs_every_smollm2_preset_and_no_policy_list():
    script = (CONFIG_DIR.parents[1] / "scripts" / "sweep_smollm2.sh").read_text()
    words = set(re.findall(r"[\w${}]+", script))
    named = {word.replace("${k}", str(k)) for word in words for k in (2, 4)}
    assert set(OLD_COMMANDS) <= named
    assert "+policy=" not in script and "kvbench -m +experiment=smollm2/" in script
