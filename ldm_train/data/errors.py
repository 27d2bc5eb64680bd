"""The error a training data set reports to its user in one line."""

from ldm_runtime.errors import UserError


class DataError(UserError, ValueError):
    """A data set a user pointed at is unusable; the message is one sentence for the CLI."""
