"""The one exception type for expected bad input."""


class DiffbenchError(Exception):
    """Bad input a user can act on; the CLI prints it as one line and exits non-zero."""
