"""``python -m kvbench``: compose the Hydra config, run it, print the rows.

Unknown config-group options are caught before Hydra composes, so a typo gets one line naming the valid
choices. Then every point (one, or each of a multirun's) is composed and validated before Hydra starts: bad
input anywhere refuses the whole run or sweep with one line, and nothing is written.
"""

from __future__ import annotations

import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from kvbench.config import CONFIG_DIR, GROUPS, check_option, config_dirs, env_search_path
from kvbench.errors import UserError
from kvbench.report import print_rows
from kvbench.runner import run
from kvbench.store import failed
from kvbench.sweep import print_sweep, record_point

GROUP_OVERRIDE = re.compile(rf"^[+~]*({'|'.join(GROUPS)})=(.+)$")
SEARCHPATH = re.compile(r"^[+~]*hydra\.searchpath=")


def command_line_search_path(argv: list[str]) -> list[str] | None:
    """The entries of a ``hydra.searchpath=[...]`` override in ``argv``, None when there is none."""
    arg = next((arg for arg in argv if SEARCHPATH.match(arg)), None)
    if arg is None:
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = OverridesParser.create().parse_override(arg).value()
    if not isinstance(value, list) or not all(isinstance(entry, str) for entry in value):
        raise UserError(f"hydra.searchpath must be a list of folders, e.g. hydra.searchpath=[file:///abs/dir]: {arg}")
    return value


def with_env_search_path(argv: list[str]) -> list[str]:
    """``argv`` with ``KVBENCH_CONFIG_PATH``'s folders added after those of its ``hydra.searchpath`` override
    (which, in Hydra, replaces config.yaml's: the environment's folders would be lost)."""
    entries, env = command_line_search_path(argv), env_search_path()
    if entries is None or not env:
        return argv
    merged = ",".join(f"'{entry}'" for entry in [*entries, *(e for e in env if e not in entries)])
    return [f"hydra.searchpath=[{merged}]" if SEARCHPATH.match(arg) else arg for arg in argv]


def check_group_overrides(argv: list[str]) -> None:
    """Reject ``policy=nope`` (and each item of ``policy=a,b``) with the list of valid options, those of the
    config folders added by ``hydra.searchpath`` / ``KVBENCH_CONFIG_PATH`` included."""
    dirs = config_dirs(command_line_search_path(argv))
    for arg in argv:
        match = GROUP_OVERRIDE.match(arg)
        if match and not re.search(r"[()\[\]$]", match.group(2)):
            for name in match.group(2).split(","):
                check_option(match.group(1), name, dirs)


class PointFailed(Exception):
    """A multirun point that failed: raised (not exited) so that Hydra records it and runs the next point."""


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one configuration. Exit 2 on bad input, 1 when a task failed at run time (its row says why); in a
    multirun both raise ``PointFailed`` instead, so the sweep goes on and Hydra exits non-zero at its end.
    A multirun's points print no table: the sweep prints one, of all its points, at its end."""
    logger = instantiate(cfg.logger)
    try:
        rows = run(cfg, logger=logger)
    except UserError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        if _multirun():
            raise PointFailed(str(error)) from None
        sys.exit(2)
    finally:
        logger.finish()
    if _multirun():
        record_point(rows)
    else:
        print_rows(rows)
    failures = [f"{row['task']}: {row['reason']}" for row in rows if failed(row)]
    if failures:
        print(f"kvbench: error: failed: {'; '.join(failures)}", file=sys.stderr)
        if _multirun():
            raise PointFailed("; ".join(failures))
        sys.exit(1)


def points(argv: list[str]) -> list[list[str]] | None:
    """The override lists of the run (one) or of every multirun point; None for Hydra's own flags (--help,
    --cfg, ...), which Hydra handles itself."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in ("-m", "--multirun") for flag in flags):
        return None
    overrides = [arg for arg in argv if not arg.startswith("-")]
    if not flags:
        return [overrides]
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(overrides) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        params = compose("config", overrides=fixed, return_hydra_config=True).hydra.sweeper.params or {}
    # The sweeper's own grid (e.g. an experiment's hydra.sweeper.params) first, then the command line's.
    grid = [f"{key}={value}" for key, value in params.items()] + overrides
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(grid), None)
    return batch


def validate(argv: list[str]) -> list[list[str]] | None:
    """Compose and check every point (``runner.plan``) before Hydra starts: a bad point refuses the whole
    sweep, naming the point, and nothing is written (Hydra's ``.hydra/`` included). Returns the points
    (None where Hydra handles the command itself, or reports a malformed override)."""
    from hydra import compose, initialize_config_dir

    from kvbench.runner import plan

    try:
        grid = points(argv)
    except UserError:
        raise
    except Exception:  # a malformed override: Hydra reports it (and writes nothing)
        return None
    if grid is None:
        return None
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for num, overrides in enumerate(grid):
            try:
                cfg = compose("config", overrides=overrides)
            except Exception:
                return None
            try:
                plan(cfg)
            except UserError as error:
                if len(grid) > 1:
                    raise UserError(f"grid point #{num} ({' '.join(overrides)}): {error}; nothing was run") from None
                raise
    return grid


def cli() -> None:
    if sys.argv[1:2] == ["download"]:
        from kvbench.download import main as download

        download(sys.argv[2:])
        return
    try:
        sys.argv[1:] = with_env_search_path(sys.argv[1:])
        check_group_overrides(sys.argv[1:])
        grid = validate(sys.argv[1:])
    except UserError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        main()
    finally:  # a multirun's one table, also when a point failed (Hydra then exits non-zero)
        if grid is not None and len(grid) and any(flag in sys.argv[1:] for flag in ("-m", "--multirun")):
            print_sweep(len(grid))


if __name__ == "__main__":
    cli()
