"""The errors ``ldm-export`` and ``ldm-import`` report in one line (``UserError``s, like every command's)."""

from ldm_runtime.errors import UserError


class ExportError(UserError, ValueError):
    """An export a user asked for cannot be done as asked (a bad option, an existing --out, a missing tool)."""


class ValidationFailedError(ExportError):
    """The exported graphs do not match the eager model within the limits; nothing was written to --out."""


class ImportRefusedError(ExportError):
    """A source ``ldm-import`` does not take (pickled, another kind of model, a tensor that does not fit)."""
