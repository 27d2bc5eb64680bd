"""``ldm-eval``: ``ldm-eval frontier ...`` measures the speed-quality frontier (``ldm_tools.frontier``); any other
arguments evaluate one setting (``ldm_tools.evaluate``)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["frontier"]:
        from ldm_tools import frontier

        return frontier.main(argv[1:])
    from ldm_tools import evaluate

    return evaluate.main(argv)
