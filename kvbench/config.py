"""Where the Hydra configs live and what options each group offers (for one-line errors and tests)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from kvbench.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("model", "policy", "task", "logger")


def _default_data_dir() -> str:
    from kvbench.download import default_data_dir

    return default_data_dir()


# config.yaml's default data_dir: KVBENCH_DATA_DIR, else ../shared/data when it exists, else kvbench download's folder.
OmegaConf.register_new_resolver("kvbench_data_dir", _default_data_dir, replace=True)


def options(group: str) -> list[str]:
    """Option names of a config group, nested ones as ``family/name`` (e.g. ``longbench/qasper``)."""
    root = CONFIG_DIR / group
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.rglob("*.yaml"))


def check_option(group: str, name: str) -> None:
    if name not in options(group):
        raise UserError(f"unknown {group} '{name}'; valid: {', '.join(options(group))}")


def model_spec(name: str):
    """The ``ModelSpec`` of ``configs/model/<name>.yaml``, without composing the whole app config."""
    from kvbench.models import ModelSpec

    check_option("model", name)
    fields = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml"), resolve=True)
    fields.pop("_target_", None)
    return ModelSpec(**fields)
