"""What the commands share at their edge: a parser whose errors are one line, and the one line itself.

Every command (``ldm-sample``, ``ldm-serve``, ``ldm-bench``, ``ldm-eval``, ``ldm-train``, ``ldm-export``,
``ldm-import``) catches ``UserError`` and only it, and reports it with ``report_user_error``: ``PROG: error: ...``
on stderr, exit status 2. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from ldm_runtime.errors import UsageError, UserError

USER_ERROR_STATUS = 2  # argparse's status for a bad command line, used for every error a user can fix


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line raises ``UsageError`` (one line) instead of printing the usage
    block and exiting; ``--help`` still prints and exits 0."""

    def error(self, message: str) -> None:
        raise UsageError(message)


def report_user_error(prog: str, error: UserError) -> int:
    """Print ``error``'s first line as ``PROG: error: ...`` on stderr; returns the exit status, 2."""
    text = str(error).strip()
    print(f"{prog}: error: {text.splitlines()[0] if text else type(error).__name__}", file=sys.stderr, flush=True)
    return USER_ERROR_STATUS
