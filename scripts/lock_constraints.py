"""Prints a lock file (requirements/lock.txt) as pip constraints for the interpreter that runs it.

Every pin is kept except torch's (scripts/bootstrap.sh installs torch itself and never replaces one that is there:
the installed torch's own version is pinned instead) and except a pin that the installed torch's requirements
exclude: a CUDA build's exact triton and nvidia-* pins win over the lock's, so a GPU user's torch keeps working.
Usage: python lock_constraints.py LOCK > constraints.txt
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare venv: pip carries its own copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name


def installed_torch() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_requirements(torch: importlib.metadata.Distribution | None) -> dict[str, Requirement]:
    """The requirements of the installed torch that apply here (no extras), by canonical name."""
    requires = (torch.requires or []) if torch is not None else []
    applying = {}
    for text in requires:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            applying[canonicalize_name(requirement.name)] = requirement
    return applying


def constraints(lock_text: str, torch_requirements: dict[str, Requirement]) -> list[str]:
    kept = []
    for number, line in enumerate(lock_text.splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text or line[0].isspace():
            continue
        try:
            pin = Requirement(text)
        except InvalidRequirement as error:
            raise SystemExit(f"lock_constraints: line {number} of the lock is not a requirement ({error})")
        name = canonicalize_name(pin.name)
        if name == "torch":
            continue
        wanted = torch_requirements.get(name)
        locked = [spec.version for spec in pin.specifier if spec.operator == "=="]
        if wanted is not None and locked and not wanted.specifier.contains(locked[0], prereleases=True):
            print(f"lock_constraints: {pin.name} {locked[0]} left to torch, which requires {wanted}",
                  file=sys.stderr)
            continue
        kept.append(text)
    return kept


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: lock_constraints.py LOCK", file=sys.stderr)
        return 2
    lock = Path(argv[0])
    if not lock.is_file():
        print(f"lock_constraints: {lock} is not a file; expected the lock (requirements/lock.txt)", file=sys.stderr)
        return 2
    torch = installed_torch()
    pins = constraints(lock.read_text(), torch_requirements(torch))
    if torch is not None:
        pins.append(f"torch=={torch.version}")  # pip may not replace it to satisfy anything it installs
    print("\n".join(pins))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
