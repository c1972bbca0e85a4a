"""Where the Hydra configs live, what options each group offers, and the typed checks of every config key
(one-line errors before any model loads)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

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


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (plain Python, as ``OmegaConf.to_container`` gives it) has the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0] if args else Any) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if origin in (list, tuple):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_fields(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Check ``values`` against the type hints (and ``metadata["min"]``) of dataclass ``cls``'s fields.

    Raises a one-line ``UserError`` naming the key, what it must be and what it got, or the valid keys.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key.startswith("_"):
            continue
        if key not in fields:
            raise UserError(f"unknown key {prefix}{key}; valid: {', '.join(sorted(fields))}")
        hint = hints[key]
        if not _matches(value, hint):
            if typing.get_origin(hint) is Literal:
                valid = ", ".join(map(str, typing.get_args(hint)))
                raise UserError(f"unknown {prefix}{key} '{value}'; valid: {valid}")
            raise UserError(f"{prefix}{key} must be {_describe(hint)}, got {value!r}")
        low = fields[key].metadata.get("min")
        if low is not None and value is not None and value < low:
            raise UserError(f"{prefix}{key} must be at least {low}, got {value!r}")


def positive(default: Any) -> Any:
    """A dataclass field whose value, when set, must be >= 1."""
    return dataclasses.field(default=default, metadata={"min": 1})


@dataclass(frozen=True)
class Settings:
    """The top-level keys of ``configs/config.yaml`` and their types (checked before anything runs)."""

    budget: float | None = None
    budget_tokens: int | None = positive(None)
    protocol: Literal["official", "query_agnostic"] = "official"
    limit: int | None = positive(None)
    results_dir: str = "results/runs"
    data_dir: str = "."
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: str = "sdpa"  # checked against kvbench.engine.kernels.KERNELS by runner.check_kernel
    batch_size: int = positive(1)
    chunk_size: int = positive(1024)
    prefill_eviction: Literal["whole", "chunked"] = "whole"
    diagnostics: bool = True
    progress: bool = True
    sweep_id: str | None = None


def check_settings(cfg: Any) -> None:
    """Type-check the top-level keys, the model's and the policy's and task's fields (``_target_`` classes)."""
    from omegaconf import DictConfig

    values = {key: value for key, value in cfg.items() if not isinstance(value, DictConfig)}
    check_fields(Settings, OmegaConf.to_container(OmegaConf.create(values), resolve=True))
    for group in ("policy", "task"):
        node = cfg.get(group)
        if node is not None and "_target_" in node:
            from hydra.utils import get_class

            cls = get_class(node._target_)
            if dataclasses.is_dataclass(cls):
                check_fields(cls, OmegaConf.to_container(node, resolve=True), prefix=f"{group}.")
