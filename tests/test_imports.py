"""The package's import graph: no cycle anywhere (imports inside functions included), and the layer rule
that `sampling` knows nothing of the application above it."""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sampling", "rtdlm_experiments")
SAMPLING_MUST_NOT_IMPORT = ("rtdlm_experiments", "hydra", "omegaconf", "mlflow", "pandas", "transformers")


def module_files() -> dict[str, Path]:
    """Every module of the packages by dotted name (a package by its own name, its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """``(dotted name, line)`` of every import in the file, wherever it is (in functions, under
    ``TYPE_CHECKING``); ``from a import b`` yields ``a.b``, which is module ``a.b`` or a name in ``a``."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """Module → {package module it imports: line}.

    An imported name resolves to its longest prefix that is a module (``from a import f`` imports
    ``a``). Importing ``a.b.c`` first imports ``a`` and ``a.b``, so they count too, except a module's
    own enclosing packages, which are already being imported when it runs; naming its own package
    outright (``from sampling import SamplingConfig`` inside ``sampling.decoding``) does count.
    """
    modules = module_files()
    graph: dict[str, dict[str, int]] = {module: {} for module in modules}
    for module, path in modules.items():
        for name, line in imported_names(module, path):
            parts = name.split(".")
            prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
            found = [prefix for prefix in prefixes if prefix in modules]
            for target in found:
                implicit_ancestor = target != found[-1] and module.startswith(f"{target}.")
                if target != module and not implicit_ancestor:
                    graph[module].setdefault(target, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """A cycle as ``[a, b, ..., a]``, or None (depth-first search with colours)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return (
        " -> ".join(
            f"{source} (line {graph[source][target]})" for source, target in itertools.pairwise(cycle)
        )
        + f" -> {cycle[-1]}"
    )


def test_find_cycle_reports_the_path():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert describe(["a", "b", "c", "a"], graph) == "a (line 1) -> b (line 2) -> c (line 3) -> a"
    assert find_cycle({"a": {"b": 1}, "b": {}, "c": {"a": 2, "b": 3}}) is None


def test_imports_inside_functions_and_relative_imports_are_seen(tmp_path: Path):
    path = tmp_path / "mod.py"
    path.write_text("from . import sibling\n\ndef f():\n    from rtdlm_experiments.analysis.report import x\n")  # noqa: E501
    names = {name for name, _ in imported_names("rtdlm_experiments.mod", path)}
    assert names == {"rtdlm_experiments.sibling", "rtdlm_experiments.analysis.report.x"}


def test_the_graph_sees_the_packages_modules():
    graph = import_graph()
    assert {
        "sampling",
        "sampling.decoding.base",
        "rtdlm_experiments.job.app",
        "rtdlm_experiments.tracking",
    } <= set(graph)
    assert "sampling" in graph["rtdlm_experiments.job.app"]


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe(cycle, graph)}"


@pytest.mark.parametrize("module", sorted(name for name in module_files() if name.startswith("sampling")))
def test_sampling_imports_nothing_above_it(module: str):
    path = module_files()[module]
    bad = sorted(
        f"{name} (line {line})"
        for name, line in imported_names(module, path)
        if name.split(".")[0] in SAMPLING_MUST_NOT_IMPORT
    )
    assert not bad, f"{module} imports {', '.join(bad)}"


def _is_in(module: str, package: str) -> bool:
    return module == package or module.startswith(f"{package}.")


@pytest.mark.parametrize(
    "module", sorted(name for name in module_files() if name.startswith("rtdlm_experiments"))
)
def test_mlflow_is_imported_only_inside_tracking(module: str):
    if _is_in(module, "rtdlm_experiments.tracking"):
        return
    path = module_files()[module]
    bad = [
        f"{name} (line {line})"
        for name, line in imported_names(module, path)
        if name.split(".")[0] == "mlflow"
    ]
    assert not bad, f"{module} imports {', '.join(bad)}: MLflow belongs in rtdlm_experiments.tracking"


def test_tracking_never_imports_models():
    """What a run records of its model comes from the job's record (``environment.weights_sha256``)."""
    graph = import_graph()
    bad = {
        f"{module} (line {line})": target
        for module, targets in graph.items()
        if _is_in(module, "rtdlm_experiments.tracking")
        for target, line in targets.items()
        if _is_in(target, "rtdlm_experiments.models")
    }
    assert not bad, f"tracking imports models: {bad}"


_NOT_TAG_NAMES = {"rtdlm.output_root", "rtdlm.config_groups"}
"""OmegaConf resolvers (``${rtdlm.output_root:}``), not MLflow tags."""


def test_tag_names_are_spelled_only_in_tracking_names():
    spelled = []
    for module, path in module_files().items():
        if module == "rtdlm_experiments.tracking.names":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            value = node.value if isinstance(node, ast.Constant) else None
            if isinstance(value, str) and value.startswith("rtdlm.") and value not in _NOT_TAG_NAMES:
                spelled.append(f"{module} line {node.lineno}: {value!r}")
    assert not spelled, "tag names belong in rtdlm_experiments.tracking.names: " + "; ".join(spelled)


@pytest.mark.parametrize("module", ["rtdlm_experiments.tracking", "rtdlm_experiments.config.paths"])
def test_tracking_and_paths_load_without_torch(module: str):
    """They need output paths, not the config schema (which imports `sampling`, so torch)."""
    import subprocess
    import sys

    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
