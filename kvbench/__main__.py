"""``python -m kvbench``: compose the Hydra config, run it, print the rows.

Unknown config-group options are caught before Hydra composes, so a typo gets one line naming the valid
choices; every other bad input surfaces as a ``UserError`` raised before anything is written.
"""

from __future__ import annotations

import re
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from kvbench.config import CONFIG_DIR, GROUPS, check_option
from kvbench.errors import UserError
from kvbench.report import print_rows
from kvbench.runner import run
from kvbench.store import failed

GROUP_OVERRIDE = re.compile(rf"^[+~]*({'|'.join(GROUPS)})=(.+)$")


def check_group_overrides(argv: list[str]) -> None:
    """Reject ``policy=nope`` (and each item of ``policy=a,b``) with the list of valid options."""
    for arg in argv:
        match = GROUP_OVERRIDE.match(arg)
        if match and not re.search(r"[()\[\]$]", match.group(2)):
            for name in match.group(2).split(","):
                check_option(match.group(1), name)


class PointFailed(Exception):
    """A multirun point that failed: raised (not exited) so that Hydra records it and runs the next point."""


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    """Run one configuration. Exit 2 on bad input, 1 when a task failed at run time (its row says why); in a
    multirun both raise ``PointFailed`` instead, so the sweep goes on and Hydra exits non-zero at its end."""
    logger = instantiate(cfg.logger)
    try:
        rows = run(cfg)
        logger.log_rows(cfg, rows)
    except UserError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        if _multirun():
            raise PointFailed(str(error)) from None
        sys.exit(2)
    finally:
        logger.finish()
    print_rows(rows)
    failures = [f"{row['task']}: {row['reason']}" for row in rows if failed(row)]
    if failures:
        print(f"kvbench: error: failed: {'; '.join(failures)}", file=sys.stderr)
        if _multirun():
            raise PointFailed("; ".join(failures))
        sys.exit(1)


def cli() -> None:
    try:
        check_group_overrides(sys.argv[1:])
    except UserError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
