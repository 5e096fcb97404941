"""The package's one exception type."""


class TracInError(ValueError):
    """Bad input or state: the message names the problem and the fix."""
