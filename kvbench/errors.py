"""The one exception type that the command line turns into a single-line message."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input from the user (unknown name, budget out of range, missing data): exit 2, one line."""


def instantiate(node: Any, **overrides: Any) -> Any:
    """Hydra's ``instantiate``, with a ``UserError`` that the class's constructor raises (a bad field value, a
    wrapper's unknown scorer) passed on as it is, one line, instead of Hydra's wrapped traceback."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **overrides)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise
