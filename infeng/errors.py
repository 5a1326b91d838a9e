"""The one exception type for bad input: the CLI prints its message as one line and exits ≠0."""


class InfengError(Exception):
    """A user-facing error: bad file, bad option, bad request. The message names what and where."""
