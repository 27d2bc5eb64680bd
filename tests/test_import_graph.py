"""The import graph of the top-level packages: the library (``ldm_runtime``) imports no stage, the stages import
the library and not each other, the tools sit above them all, and nothing outside ``tests/`` imports the tests.
Inside the packages, no two files import each other (directly or through others), and ``ldm_runtime``'s modules
sit on floors (``RUNTIME_FLOORS``) that import only down.

Every ``.py`` file is parsed with ``ast`` and every import counts, the ones inside functions included (a lazy
import is still an edge: the code cannot run without the package it names).
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, TypeVar

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("ldm_runtime", "ldm_kernels", "ldm_train", "ldm_export", "ldm_serve", "ldm_tools")
SCRIPT_FOLDERS = ("benchmarks", "scripts")  # loose scripts: they may import any package, never the tests
# importer -> the top-level packages it must not import
FORBIDDEN = {
    "ldm_runtime": {"ldm_train", "ldm_export", "ldm_serve", "ldm_tools", "tests"},
    "ldm_kernels": {"ldm_runtime", "ldm_train", "ldm_export", "ldm_serve", "ldm_tools", "tests"},
    "ldm_train": {"ldm_export", "ldm_serve", "ldm_tools", "tests"},
    "ldm_export": {"ldm_train", "ldm_serve", "ldm_tools", "tests"},
    "ldm_serve": {"ldm_train", "ldm_export", "ldm_tools", "tests"},
    "ldm_tools": {"tests"},
    "benchmarks": {"tests"},
    "scripts": {"tests"},
}
# ldm_runtime's floors, lowest first: a module imports its own floor and those below, never one above.
# A name ending in "/" is a folder: every module in it.
RUNTIME_FLOORS = {
    "basics": ("__init__.py", "errors.py", "arrays.py", "files.py", "safetensors_header.py", "staging.py",
               "folder_swap.py", "images.py", "previews.py", "command_line.py"),
    "numerics": ("config.py", "noise.py", "guidance.py", "deep_cache.py", "schedulers/", "models/"),  # the model, maths
    "folders": ("checkpoint.py", "manifest.py", "adapters.py"),  # reading a checkpoint dir, an engine dir, adapters
    "engines": ("engines/",),
    "pipeline": ("pipeline.py",),
    "sample": ("sample.py",),
}
Node = TypeVar("Node")


@dataclass(frozen=True)
class ImportEdge:
    file: Path  # relative to the repository
    line: int
    module: str  # the absolute module name imported
    names: tuple[str, ...] = ()  # what ``from module import ...`` takes: attributes or submodules

    @property
    def target(self) -> str:
        return self.module.split(".")[0]

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: imports {self.module}"


def imports_in(source: str, file: Path, package_path: str | None) -> list[ImportEdge]:
    """Every module ``source`` imports, wherever the import statement stands (module level, a function, a
    ``try``, an ``if TYPE_CHECKING``), plus ``importlib.import_module("...")`` calls with a literal name.
    ``package_path``: the dotted package ``file`` is in, to resolve relative imports (None for scripts)."""
    edges = []
    for node in ast.walk(ast.parse(source, filename=str(file))):
        if isinstance(node, ast.Import):
            edges += [ImportEdge(file, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert package_path is not None, f"{file}:{node.lineno}: a relative import outside a package"
                base = package_path.split(".")[:len(package_path.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            edges.append(ImportEdge(file, node.lineno, module, tuple(alias.name for alias in node.names)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            edges.append(ImportEdge(file, node.lineno, node.args[0].value))
    return sorted(edges, key=lambda edge: edge.line)


def project_imports(root: Path = REPO) -> dict[str, list[ImportEdge]]:
    """Importer (a top-level package or script folder) -> every import edge of its files."""
    graph: dict[str, list[ImportEdge]] = {}
    for importer in (*PACKAGES, *SCRIPT_FOLDERS):
        for path in sorted((root / importer).rglob("*.py")):
            relative = path.relative_to(root)
            package_path = ".".join(relative.parent.parts) if importer in PACKAGES else None
            graph.setdefault(importer, []).extend(imports_in(path.read_text(), relative, package_path))
    return graph


def forbidden_edges(graph: dict[str, list[ImportEdge]]) -> list[str]:
    """One line per import that breaks the layout: ``file:line: imports module (A must not import B)``."""
    return [f"{edge} ({importer} must not import {edge.target})"
            for importer, edges in graph.items() for edge in edges if edge.target in FORBIDDEN.get(importer, ())]


def _reachable(depends: Mapping[Node, Iterable[Node]], start: Node) -> set[Node]:
    """Every node ``start`` leads to through one or more edges of ``depends`` (itself only through a cycle)."""
    seen, todo = set(), [start]
    while todo:
        for target in depends.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def package_cycles(graph: dict[str, list[ImportEdge]]) -> list[str]:
    """Pairs of top-level packages that import each other, directly or through others."""
    depends = {importer: {edge.target for edge in edges if edge.target in PACKAGES and edge.target != importer}
               for importer, edges in graph.items() if importer in PACKAGES}
    return [f"{a} and {b} import each other" for a in sorted(depends) for b in sorted(_reachable(depends, a))
            if a < b and a in _reachable(depends, b)]


def module_name(file: Path) -> str:
    """``ldm_runtime/engines/base.py`` -> ``ldm_runtime.engines.base``; a package's ``__init__.py`` -> the package."""
    parts = file.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Dotted module name -> file (relative to the repository) of every module in the packages."""
    return {module_name(path.relative_to(root)): path.relative_to(root)
            for package in PACKAGES for path in (root / package).rglob("*.py")}


def file_edges(graph: dict[str, list[ImportEdge]], modules: dict[str, Path]) -> list[tuple[ImportEdge, Path]]:
    """Each import of a project module as (the import, the file it runs): ``from a import b`` runs a/b.py where b
    is a module, else a's own file. The packages' ``__init__.py`` that Python runs on the way are not counted: a
    package may load its own modules, lazily, and they may import each other through their full names."""
    resolved = []
    for edge in (edge for edges in graph.values() for edge in edges):
        targets = {modules.get(f"{edge.module}.{name}", modules.get(edge.module)) for name in edge.names or ("",)}
        resolved += [(edge, target) for target in sorted(targets - {None, edge.file})]
    return resolved


def _cycle_through(depends: dict[Path, dict[Path, ImportEdge]], start: Path) -> str:
    """The shortest chain of imports from ``start`` back to it: ``a.py:12 -> b.py:30 -> a.py``."""
    came_from: dict[Path, ImportEdge] = {}  # file -> the import that first reached it
    todo = deque([start])
    while todo:
        file = todo.popleft()
        for target, edge in sorted(depends.get(file, {}).items()):
            if target == start:
                chain = [edge]
                while edge.file != start:
                    edge = came_from[edge.file]
                    chain.append(edge)
                return " -> ".join(f"{edge.file}:{edge.line}" for edge in reversed(chain)) + f" -> {start}"
            if target not in came_from:
                came_from[target] = edge
                todo.append(target)
    raise AssertionError(f"{start} is in no cycle")


def file_cycles(edges: list[tuple[ImportEdge, Path]]) -> list[str]:
    """One line per group of files that import each other, directly or through others (lazy imports count): the
    shortest cycle through the first of them, with the line of each import, and the whole group where it is larger."""
    depends: dict[Path, dict[Path, ImportEdge]] = {}
    for edge, target in edges:
        depends.setdefault(edge.file, {}).setdefault(target, edge)
    reach = {file: _reachable(depends, file) for file in depends}
    lines, grouped = [], set()
    for file in sorted(depends):
        if file in grouped or file not in reach[file]:
            continue
        group = sorted(other for other in reach[file] if file in reach.get(other, ()))
        grouped.update(group)
        cycle = _cycle_through(depends, file)
        larger = f" (in all: {', '.join(map(str, group))})" if cycle.count(" -> ") < len(group) else ""
        lines.append(f"import cycle: {cycle}{larger}")
    return lines


def runtime_floors_of(file: Path, floors: dict[str, tuple[str, ...]] = RUNTIME_FLOORS) -> list[str]:
    """The floors whose entries name ``file``, an ldm_runtime module (exactly one in a right table)."""
    inside = file.relative_to("ldm_runtime").as_posix()
    return [floor for floor, names in floors.items() for name in names
            if inside == name or (name.endswith("/") and inside.startswith(name))]


def floor_problems(edges: list[tuple[ImportEdge, Path]], modules: dict[str, Path],
                   floors: dict[str, tuple[str, ...]] = RUNTIME_FLOORS) -> list[str]:
    """One line per ldm_runtime module on no floor or on several, and per import of a module on a higher floor."""
    problems = []
    for file in sorted(file for file in modules.values() if file.parts[0] == "ldm_runtime"):
        found = runtime_floors_of(file, floors)
        if not found:
            problems.append(f"{file} is on no floor; add it to RUNTIME_FLOORS, on the floor of what it imports")
        elif len(found) > 1:
            problems.append(f"{file} is on the floors {', '.join(found)}; expected one")
    order = list(floors)
    for edge, target in edges:
        if edge.file.parts[0] != "ldm_runtime" or target.parts[0] != "ldm_runtime":
            continue
        mine, theirs = runtime_floors_of(edge.file, floors), runtime_floors_of(target, floors)
        if len(mine) == len(theirs) == 1 and order.index(mine[0]) < order.index(theirs[0]):
            problems.append(f"{edge.file}:{edge.line}: imports {target} (the {mine[0]} floor must not import the "
                            f"{theirs[0]} floor above it)")
    return problems


def test_no_package_imports_what_the_layout_forbids():
    graph = project_imports()
    problems = forbidden_edges(graph)
    assert not problems, "imports that break the layout:\n" + "\n".join(problems)
    assert set(graph) >= {*PACKAGES, "benchmarks"}, sorted(graph)


def test_no_two_top_level_packages_import_each_other():
    cycles = package_cycles(project_imports())
    assert not cycles, "\n".join(cycles)


def test_no_file_imports_one_that_imports_it_back():
    cycles = file_cycles(file_edges(project_imports(), module_files()))
    assert not cycles, "\n".join(cycles)


def test_every_runtime_module_is_on_one_floor_and_imports_nothing_above_it():
    modules = module_files()
    problems = floor_problems(file_edges(project_imports(), modules), modules)
    assert not problems, "\n".join(problems)
    named = {name for names in RUNTIME_FLOORS.values() for name in names}
    runtime = [file.relative_to("ldm_runtime").as_posix() for file in modules.values()
               if file.parts[0] == "ldm_runtime"]
    stale = sorted(name for name in named if not any(inside == name or inside.startswith(name) for inside in runtime))
    assert not stale, f"RUNTIME_FLOORS names modules that do not exist: {stale}"


def test_the_cycle_and_floor_checks_fire_on_a_bad_graph():
    sources = {
        "ldm_runtime/config.py": "def load():\n    from ldm_runtime import sample\n",
        "ldm_runtime/sample.py": "from ldm_runtime.config import ModelConfig\n",
        "ldm_runtime/brand_new.py": "import numpy\n",
        # a package that loads its modules lazily, which import each other by full name: no cycle
        "ldm_runtime/engines/__init__.py": "def load():\n    from .torch_engine import TorchEngine\n",
        "ldm_runtime/engines/torch_engine.py": "from ldm_runtime.engines.base import Engine\nfrom . import base\n",
        "ldm_runtime/engines/base.py": "from ldm_runtime.errors import EngineLoadError\n",
        "ldm_runtime/errors.py": "",
        "ldm_export/a.py": "from ldm_export.b import convert\n",
        "ldm_export/b.py": "from . import c\n",
        "ldm_export/c.py": "def run():\n    import ldm_export.a\n",
    }
    files = [Path(name) for name in sources]
    modules = {module_name(file): file for file in files}
    graph = {"synthetic": [edge for file in files
                           for edge in imports_in(sources[str(file)], file, ".".join(file.parent.parts))]}
    edges = file_edges(graph, modules)
    assert file_cycles(edges) == [
        "import cycle: ldm_export/a.py:1 -> ldm_export/b.py:1 -> ldm_export/c.py:2 -> ldm_export/a.py",
        "import cycle: ldm_runtime/config.py:2 -> ldm_runtime/sample.py:1 -> ldm_runtime/config.py"]
    assert floor_problems(edges, modules) == [
        "ldm_runtime/brand_new.py is on no floor; add it to RUNTIME_FLOORS, on the floor of what it imports",
        "ldm_runtime/config.py:2: imports ldm_runtime/sample.py (the numerics floor must not import the sample floor "
        "above it)"]
    doubled = {**RUNTIME_FLOORS, "basics": (*RUNTIME_FLOORS["basics"], "brand_new.py", "sample.py")}
    assert floor_problems([], modules, doubled) == [
        "ldm_runtime/sample.py is on the floors basics, sample; expected one"]


def test_the_scan_sees_lazy_relative_and_importlib_imports():
    source = ("import numpy\n"
              "def load():\n"
              "    from ldm_train.checkpoint import save_checkpoint\n"
              "    try:\n"
              "        import ldm_export.cli as cli\n"
              "    except ImportError:\n"
              "        pass\n"
              "    return importlib.import_module('ldm_tools.bench')\n"
              "from .schedulers import ddim\n")
    edges = imports_in(source, Path("ldm_runtime/engines/example.py"), "ldm_runtime.engines")
    assert [(edge.line, edge.module) for edge in edges] == [
        (1, "numpy"), (3, "ldm_train.checkpoint"), (5, "ldm_export.cli"), (8, "ldm_tools.bench"),
        (9, "ldm_runtime.engines.schedulers")]
    graph = {"ldm_runtime": edges, "ldm_export": [ImportEdge(Path("ldm_export/x.py"), 4, "ldm_runtime.pipeline")],
             "ldm_train": [ImportEdge(Path("ldm_train/y.py"), 2, "ldm_export.cli")]}
    assert forbidden_edges(graph) == [
        "ldm_runtime/engines/example.py:3: imports ldm_train.checkpoint (ldm_runtime must not import ldm_train)",
        "ldm_runtime/engines/example.py:5: imports ldm_export.cli (ldm_runtime must not import ldm_export)",
        "ldm_runtime/engines/example.py:8: imports ldm_tools.bench (ldm_runtime must not import ldm_tools)",
        "ldm_train/y.py:2: imports ldm_export.cli (ldm_train must not import ldm_export)"]
    assert package_cycles(graph) == ["ldm_export and ldm_runtime import each other",
                                     "ldm_export and ldm_train import each other",
                                     "ldm_runtime and ldm_train import each other"]

