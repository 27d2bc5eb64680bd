"""The wheel this project builds: every import name it installs is the project's own (``ldm_*``), it holds every
module of the packages and their data (the try-it page), and each console script names a module inside it.

The wheel is built offline (no build isolation, no index) with the environment's setuptools, from a copy of the
tree: a build writes ``build/`` and ``*.egg-info`` beside its sources, never into the repository.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.test_import_graph import PACKAGES

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCES = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "runs")
PACKAGE_DATA = ("ldm_serve/page.html",)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "--wheel-dir", str(root / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    [built] = (root / "dist").glob("*.whl")
    with zipfile.ZipFile(built) as opened:
        yield opened


def test_every_import_name_the_wheel_installs_is_ldm(wheel):
    top_level = {entry.split("/")[0] for entry in wheel.namelist()}
    import_names = {name.removesuffix(".py") for name in top_level if not name.endswith(".dist-info")}
    assert import_names >= set(PACKAGES), sorted(import_names)
    assert all(name.startswith("ldm_") for name in import_names), sorted(import_names)


def test_the_wheel_holds_every_module_of_the_packages_and_their_data(wheel):
    modules = {path.relative_to(REPO).as_posix() for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    assert sorted(modules - set(wheel.namelist())) == []
    assert sorted(set(PACKAGE_DATA) - set(wheel.namelist())) == []


def test_every_console_script_names_a_module_in_the_wheel(wheel):
    [entry_points] = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    scripts = dict(parser["console_scripts"])
    assert "ldm-serve" in scripts and "ldm-sample" in scripts, scripts
    for command, target in scripts.items():
        module = target.partition(":")[0].replace(".", "/")
        assert {f"{module}.py", f"{module}/__init__.py"} & set(wheel.namelist()), f"{command} = {target}"
