"""``python -m kvbench``: compose the Hydra config, run it, print the rows.

Unknown config-group options are caught before Hydra composes, so a typo gets one line naming the valid
choices; every other bad input surfaces as a ``UserError`` raised before anything is written.
"""

from __future__ import annotations

import re
import sys

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from kvbench.config import CONFIG_DIR, GROUPS, check_option
from kvbench.errors import UserError
from kvbench.report import print_rows
from kvbench.runner import run

GROUP_OVERRIDE = re.compile(rf"^[+~]*({'|'.join(GROUPS)})=(.+)$")


def check_group_overrides(argv: list[str]) -> None:
    """Reject ``policy=nope`` (and each item of ``policy=a,b``) with the list of valid options."""
    for arg in argv:
        match = GROUP_OVERRIDE.match(arg)
        if match and not re.search(r"[()\[\]$]", match.group(2)):
            for name in match.group(2).split(","):
                check_option(match.group(1), name)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    logger = instantiate(cfg.logger)
    try:
        rows = run(cfg)
        logger.log_rows(cfg, rows)
    except UserError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        logger.finish()
    print_rows(rows)


def cli() -> None:
    if sys.argv[1:2] == ["download"]:
        from kvbench.download import main as download

        download(sys.argv[2:])
        return
    try:
        check_group_overrides(sys.argv[1:])
    except UserError as error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
