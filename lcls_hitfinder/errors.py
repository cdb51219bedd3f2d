"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config key): reported in one line, never a traceback."""
