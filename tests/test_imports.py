"""The project's imports, read from the source (issue 18): no import cycles, no import of a module that does not exist,
the method table read through utils.methods, and the engine (utils/kernels/, utils/methods/) importing none of the
run or benchmark infrastructure (utils/bench/, utils/runs/, data/); and no top-level script over 400 lines.

The graph is built by parsing, not by importing: every `import` and `from ... import` statement of every project
file, including those inside functions (a function-level import is a cycle that is only hidden until the function
runs), resolved to project modules. `from package import name` counts as an import of `package.name` when that is
a module. A package's own `__init__` is not an implicit import of its submodules, nor the reverse.

    python tests/test_imports.py     prints every cycle (each elementary cycle once)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {".venv", ".git", "__pycache__", "results_latency", "results_longbench", "results_needle",
                "results_recall"}


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the repository (outside virtualenvs and result folders)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(p in SKIPPED_DIRS or p.startswith(".") for p in parts[:-1]):
            continue
        names = list(parts[:-1]) + ([] if path.name == "__init__.py" else [path.stem])
        if names:
            modules[".".join(names)] = path
    return modules


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imported_names(node: ast.AST, module: str, modules: dict[str, Path]) -> list[str]:
    """The dotted names one import statement asks for (before resolution to project modules): `import a.b, c` ->
    [a.b, c]; `from a import b, c` -> [a, a.b, a.c] (a.b counts where it is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: the package of `module`, then `level - 1` packages up
        package = module.split(".") if _is_package(module, modules) else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    return [prefix] + [f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names]


def import_statements(modules: dict[str, Path]):
    """(module, the dotted names one of its import statements asks for, the statement), for every statement."""
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield module, _imported_names(node, module, modules), node


def import_graph(modules: dict[str, Path] | None = None) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its source."""
    modules = project_modules() if modules is None else modules
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for module, names, _ in import_statements(modules):
        graph[module].update(name for name in names if name in modules and name != module)
    return graph


def import_cycles(graph: dict[str, set[str]], most: int = 100) -> list[list[str]]:
    """Every elementary cycle (up to `most`), each as [a, b, ..., a] starting at its alphabetically first module.

    A depth-first walk from each module `start` that only visits modules after `start`, so that each cycle is
    found once, from its first module. Exponential in the worst case; the project graph has ~100 modules.
    """
    cycles: list[list[str]] = []

    def walk(start: str, path: list[str]) -> None:
        for nxt in sorted(graph[path[-1]]):
            if len(cycles) >= most:
                return
            if nxt == start:
                cycles.append(path + [start])
            elif nxt > start and nxt not in path:
                walk(start, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in cycles)


def missing_modules(modules: dict[str, Path] | None = None) -> list[str]:
    """Imports of project modules that do not exist ("module: name"), e.g. one left behind by a move, which the
    graph would otherwise pass over. A name counts as a project module when its first part is a project package."""
    modules = project_modules() if modules is None else modules
    roots = {name.split(".")[0] for name in modules}
    found = []
    for module, names, node in import_statements(modules):
        wanted = names if isinstance(node, ast.Import) else names[:1]  # `import a.b`: a.b; `from a import b`: a
        found += [f"{module}: {name}" for name in wanted if name.split(".")[0] in roots and name not in modules]
    return found


TABLE_READERS = {"METHODS", "get_method", "method_names"}  # what only utils.methods may take from utils.methods.registry


def registry_table_reads(modules: dict[str, Path] | None = None) -> list[str]:
    """Modules that read the method table from utils.methods.registry, where only "dense" is registered, instead of from
    utils.methods, which imports every method module first (returns "module: names")."""
    modules = project_modules() if modules is None else modules
    found = []
    for module, names, node in import_statements(modules):
        if module != "utils.methods" and isinstance(node, ast.ImportFrom) and names[0] == "utils.methods.registry":
            taken = sorted(TABLE_READERS & {alias.name for alias in node.names})
            if taken:
                found.append(f"{module}: {', '.join(taken)}")
    return found


ENGINE_PACKAGES = ("utils.kernels", "utils.methods")  # issue 23: what a patched model's attention runs
NOT_FOR_THE_ENGINE = ("utils.bench", "utils.runs", "data")  # benchmarks, results files and flags, data sets


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def engine_imports_of_infrastructure(modules: dict[str, Path] | None = None) -> list[str]:
    """Imports, anywhere in a file of utils/kernels/ or utils/methods/, of utils/bench/, utils/runs/ or data/
    ("module: name"): the engine must load and run without the runners' infrastructure."""
    modules = project_modules() if modules is None else modules
    found = []
    for module, names, node in import_statements(modules):
        if _within(module, ENGINE_PACKAGES):  # `from utils import runs` asks for utils.runs: every name counts
            hits = [name for name in names if _within(name, NOT_FOR_THE_ENGINE)]
            found += [f"{module}: {hits[0]}"] if hits else []
    return found


def test_engine_infrastructure_check_sees_imports(tmp_path):
    """The check itself, on a small tree: a function-level import of utils.runs and `import data.x` are found."""
    for folder in ("utils", "utils/methods", "utils/runs", "data"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "utils" / "runs" / "records.py").write_text("")
    (tmp_path / "data" / "x.py").write_text("")
    (tmp_path / "utils" / "methods" / "a.py").write_text("def f():\n    from utils.runs.records import g\n")
    (tmp_path / "utils" / "methods" / "b.py").write_text("import os, data.x\n")
    (tmp_path / "utils" / "methods" / "c.py").write_text("from utils import methods, runs\n")
    (tmp_path / "utils" / "d.py").write_text("import data.x\n")  # outside the engine: allowed
    assert engine_imports_of_infrastructure(project_modules(tmp_path)) == [
        "utils.methods.a: utils.runs.records", "utils.methods.b: data.x", "utils.methods.c: utils.runs"]


def test_engine_imports_no_run_or_benchmark_code():
    modules = project_modules()
    assert {"utils.kernels", "utils.methods.dhsa.select", "utils.bench.recall"} <= set(modules)  # the layout is there
    found = engine_imports_of_infrastructure(modules)
    assert not found, "utils/kernels/ and utils/methods/ import run or benchmark code:\n" + "\n".join(found)


def test_graph_sees_function_level_and_relative_imports(tmp_path):
    """The parser itself: a function-level relative import closes a cycle that module-level imports alone do not."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from . import a\n    return a\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(project_modules(tmp_path))
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg", "pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    (pkg / "d.py").write_text("from .gone import x\nimport pkg.c\nimport os\n")
    assert missing_modules(project_modules(tmp_path)) == ["pkg.d: pkg.gone"]


def test_no_import_cycles():
    graph = import_graph()
    assert {"utils.methods.dhsa.select", "utils.methods.registry", "utils.attention"} <= set(graph)  # the walk found the package
    cycles = import_cycles(graph)
    assert not cycles, f"{len(cycles)} import cycle(s) among the project's modules:\n{describe(cycles)}"


def test_every_project_import_exists():
    missing = missing_modules()
    assert not missing, "imports of project modules that do not exist:\n" + "\n".join(missing)


MAX_SCRIPT_LINES = 400  # issue 18: a runner a newcomer reads in one sitting; reusable parts live in the packages


def long_scripts(root: Path = REPO_ROOT, most: int = MAX_SCRIPT_LINES) -> dict[str, int]:
    """The top-level scripts (every .py file at the repository root: run_*.py, eval_*.py, visualize_*.py) longer
    than `most` lines, with their line counts."""
    counts = {path.name: len(path.read_text(encoding="utf-8").splitlines()) for path in sorted(root.glob("*.py"))}
    return {name: n for name, n in counts.items() if n > most}


def test_long_scripts_are_found(tmp_path):
    (tmp_path / "run_short.py").write_text("x = 1\n" * 3)
    (tmp_path / "run_long.py").write_text("x = 1\n" * 4)
    assert long_scripts(tmp_path, most=3) == {"run_long.py": 4}


def test_no_top_level_script_over_400_lines():
    scripts = {path.name for path in REPO_ROOT.glob("*.py")}
    assert {"run_attention_recall.py", "eval_longbench.py", "run_latency_test.py"} <= scripts  # the glob found them
    found = long_scripts()
    assert not found, (f"top-level scripts over {MAX_SCRIPT_LINES} lines (move self-contained parts into utils/ or "
                       f"data/): " + ", ".join(f"{name} {n}" for name, n in found.items()))


def test_method_table_is_read_through_utils_methods():
    """`from utils.methods.registry import METHODS` would silently see "dense" only (nothing imports the method modules)."""
    readers = registry_table_reads()
    assert not readers, "read the method table from utils.methods, not utils.methods.registry:\n" + "\n".join(readers)


if __name__ == "__main__":
    found = import_cycles(import_graph())
    print(describe(found) if found else "no import cycles")
    sys.exit(1 if found else 0)
