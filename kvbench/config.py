"""Where the Hydra configs live, what options each group offers, and the typed checks of every config key
(one-line errors before any model loads)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from omegaconf import OmegaConf

from kvbench.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GROUPS = ("model", "policy", "task", "logger")
CONFIG_PATH_ENV = "KVBENCH_CONFIG_PATH"  # more config folders (os.pathsep-separated), after the package's own


def _default_data_dir() -> str:
    from kvbench.download import default_data_dir

    return default_data_dir()


# config.yaml's default data_dir: KVBENCH_DATA_DIR, else ../shared/data when it exists, else kvbench download's folder.
OmegaConf.register_new_resolver("kvbench_data_dir", _default_data_dir, replace=True)


def env_search_path() -> list[str]:
    """``KVBENCH_CONFIG_PATH``'s folders as Hydra search-path entries (``file://<absolute folder>``)."""
    folders = os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep)
    return [f"file://{Path(folder).expanduser().resolve()}" for folder in folders if folder.strip()]


# config.yaml's hydra.searchpath: KVBENCH_CONFIG_PATH's folders (the command line's hydra.searchpath replaces it;
# kvbench's CLI puts the two together, see kvbench.__main__.with_env_search_path).
OmegaConf.register_new_resolver("kvbench_config_path", env_search_path, replace=True)


# What `kvbench --help` offers, group by group (internal subgroups, such as experiments' policy variants, left out).
HELP_GROUPS = {
    "policy": "+policy=NAME",
    "task": "task=NAME",
    "model": "model=NAME",
    "logger": "logger=NAME",
    "experiment": "+experiment=NAME",
}


def help_choices(_root_: Any = None) -> str:
    """The choices of ``kvbench --help``, from every config folder of this run (``hydra.searchpath``)."""
    entries = OmegaConf.select(_root_, "hydra.searchpath") if _root_ is not None else None
    dirs = config_dirs(list(entries) if entries is not None else None)
    lines = []
    for group, usage in HELP_GROUPS.items():
        names = options(group, dirs)
        flat = [name for name in names if "/" not in name]
        lines.append(f"  {usage:<20} {', '.join(flat)}")
        if group == "task":  # families of tasks: task=longbench/qasper, task=ruler/vt, ...
            for family in sorted({name.split("/")[0] for name in names if "/" in name}):
                members = [name.split("/", 1)[1] for name in names if name.startswith(family + "/")]
                lines.append(f"  {'task=' + family + '/NAME':<20} {', '.join(members)}")
    return "\n".join(lines).replace("$", "$$") + "\n"


def help_settings() -> str:
    """The top-level settings of config.yaml as it writes them (defaults and comments), for ``--help``."""
    text = (CONFIG_DIR / "config.yaml").read_text().split("\n_self_", 1)[-1]
    lines = [line for line in text.splitlines() if line[:1].isalpha() and not line.startswith(("hydra:", "defaults"))]
    return "\n".join(f"  {line}" for line in lines).replace("$", "$$") + "\n"


OmegaConf.register_new_resolver("kvbench_choices", help_choices, replace=True)
OmegaConf.register_new_resolver("kvbench_settings", help_settings, replace=True)


def search_folder(entry: str) -> Path:
    """The folder of a Hydra search-path entry: ``file://DIR``, a plain ``DIR``, or ``pkg://package.sub``.

    Raises a one-line ``UserError`` for a folder that does not exist (Hydra would only warn)."""
    if entry.startswith("pkg://"):
        import importlib.util

        module = entry.removeprefix("pkg://").replace("/", ".").strip(".")
        root, *sub = module.split(".")
        spec = importlib.util.find_spec(root)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"config search path {entry}: no package '{root}' is importable")
        folder = Path(next(iter(spec.submodule_search_locations))).joinpath(*sub)
    else:
        folder = Path(entry.removeprefix("file://")).expanduser()
    if not folder.is_dir():
        raise UserError(f"config search path {entry}: folder {folder} does not exist")
    return folder.resolve()


def config_dirs(search_path: list[str] | None = None) -> list[Path]:
    """The config folders Hydra composes from: the package's, then ``search_path`` (Hydra ``hydra.searchpath``
    entries; default: ``KVBENCH_CONFIG_PATH``'s). The package's options win over same-named ones."""
    entries = env_search_path() if search_path is None else search_path
    return [CONFIG_DIR, *(folder for folder in map(search_folder, entries) if folder != CONFIG_DIR)]


def options(group: str, dirs: list[Path] | None = None) -> list[str]:
    """Option names of a config group in every config folder, nested ones as ``family/name``
    (e.g. ``longbench/qasper``)."""
    names = set()
    for folder in config_dirs() if dirs is None else dirs:
        root = folder / group
        names.update(str(path.relative_to(root).with_suffix("")) for path in root.rglob("*.yaml"))
    return sorted(names)


def check_option(group: str, name: str, dirs: list[Path] | None = None) -> None:
    valid = options(group, dirs)
    if name not in valid:
        raise UserError(f"unknown {group} '{name}'; valid: {', '.join(valid)}")


def option_file(group: str, name: str, dirs: list[Path] | None = None) -> Path:
    """The YAML of option ``name`` of ``group``: the first config folder's that has it."""
    check_option(group, name, dirs)
    return next(path for folder in dirs or config_dirs() if (path := folder / group / f"{name}.yaml").is_file())


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
    ids: list[str | int] | None = None  # only the examples of these ids (then ``limit`` of them)
    results_dir: str = "results/runs"
    data_dir: str = "."
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: str = "sdpa"  # checked against kvbench.engine.kernels.KERNELS by runner.check_kernel
    compile: bool = False  # decode steps under torch.compile
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
            import importlib

            module, _, name = str(node._target_).rpartition(".")
            try:
                cls = getattr(importlib.import_module(module), name)
            except Exception as error:  # a class of your own whose module is not on PYTHONPATH, a typo
                first = (str(error).strip().splitlines() or [""])[0]
                raise UserError(
                    f"{group} '{node._target_}' cannot be imported ({type(error).__name__}: {first}); "
                    "is its module on PYTHONPATH?"
                ) from None
            if dataclasses.is_dataclass(cls):
                check_fields(cls, OmegaConf.to_container(node, resolve=True), prefix=f"{group}.")
