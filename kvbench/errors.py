"""The one exception type that the command line turns into a single-line message."""


class UserError(Exception):
    """Bad input from the user (unknown name, budget out of range, missing data): exit 2, one line."""
