"""The import graph of the top-level packages: the library (``ldm_runtime``) imports no stage, the stages import
the library and not each other, the tools sit above them all, and nothing outside ``tests/`` imports the tests.

Every ``.py`` file is parsed with ``ast`` and every import counts, the ones inside functions included (a lazy
import is still an edge: the code cannot run without the package it names).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class ImportEdge:
    file: Path  # relative to the repository
    line: int
    module: str  # the absolute module name imported

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
                edges.append(ImportEdge(file, node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                edges.append(ImportEdge(file, node.lineno, node.module))
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


def package_cycles(graph: dict[str, list[ImportEdge]]) -> list[str]:
    """Pairs of top-level packages that import each other, directly or through others."""
    depends = {importer: {edge.target for edge in edges if edge.target in PACKAGES and edge.target != importer}
               for importer, edges in graph.items() if importer in PACKAGES}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in depends.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    return [f"{a} and {b} import each other" for a in sorted(depends) for b in sorted(reachable(a))
            if a < b and a in reachable(b)]


def test_no_package_imports_what_the_layout_forbids():
    graph = project_imports()
    problems = forbidden_edges(graph)
    assert not problems, "imports that break the layout:\n" + "\n".join(problems)
    assert set(graph) >= {*PACKAGES, "benchmarks"}, sorted(graph)


def test_no_two_top_level_packages_import_each_other():
    cycles = package_cycles(project_imports())
    assert not cycles, "\n".join(cycles)


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

