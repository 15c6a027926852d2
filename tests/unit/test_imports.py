"""The import graph of the sources, built from their text: no cycles, and the layers
import downwards only (config and the kernels at the bottom, the entry points on top)."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

from helpers import REPO

# Import name -> folder of a package this repository ships.
ROOTS = {"pilot_hpc": os.path.join(REPO, "src", "pilot_hpc"),
         "pilot_hpc_kernels": os.path.join(REPO, "src", "pilot_hpc_kernels")}


def _module_files() -> dict[str, str]:
    """Dotted module name -> file, for every module of the shipped packages (tests left out)."""
    out = {}
    for root, folder in ROOTS.items():
        for dirpath, _, files in os.walk(folder):
            for name in files:
                if not name.endswith(".py") or name.startswith("test_") or name == "conftest.py":
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), folder)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join([root] + rel)] = os.path.join(dirpath, name)
    return out


def _resolve(target: str, modules: dict[str, str]) -> str | None:
    """The most specific shipped module a dotted name refers to (X.Y.name -> X.Y)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def import_graph() -> dict[str, set[str]]:
    """Module -> the shipped modules it imports anywhere in its text (function-level
    imports included: a lazy import is still a dependency)."""
    modules = _module_files()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        with open(path) as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                dep = _resolve(t, modules)
                if dep is not None and dep != name:
                    graph[name].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_known_edges():
    graph = import_graph()
    assert "pilot_hpc.fl.federation" in graph["pilot_hpc.main"]  # a function-level import
    assert "pilot_hpc.train.spec" in graph["pilot_hpc.train.engines"]
    assert "pilot_hpc.fl.strategies.base" in graph["pilot_hpc.fl.strategies.fedavg"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Layers that must not import the named higher ones (a module never imports its caller).
FORBIDDEN = {
    "pilot_hpc.model": ("pilot_hpc.train", "pilot_hpc.fl", "pilot_hpc.checkpoint", "pilot_hpc.metrics",
                        "pilot_hpc.main"),
    "pilot_hpc.train": ("pilot_hpc.fl", "pilot_hpc.checkpoint", "pilot_hpc.metrics", "pilot_hpc.main"),
    "pilot_hpc.metrics": ("pilot_hpc.train", "pilot_hpc.fl", "pilot_hpc.checkpoint", "pilot_hpc.model"),
    "pilot_hpc.checkpoint": ("pilot_hpc.fl", "pilot_hpc.main"),
    "pilot_hpc.data": ("pilot_hpc.model", "pilot_hpc.train", "pilot_hpc.fl", "pilot_hpc.metrics"),
    # The planner serves the entry point and the tools alike: it sits below both.
    "pilot_hpc.memory": ("pilot_hpc.tools", "pilot_hpc.main", "pilot_hpc.fl", "pilot_hpc.train",
                         "pilot_hpc.checkpoint"),
    # The tools are developer entry points on top: the run's entry point never needs one.
    "pilot_hpc.main": ("pilot_hpc.tools",),
}


# The bottom: modules that load before torch and MPI (a config error is reported first),
# with all that each may import of the package.
LEAVES = {"pilot_hpc.errors": (), "pilot_hpc.codes": (), "pilot_hpc.sections": ("pilot_hpc.errors",),
          "pilot_hpc.config": ("pilot_hpc.errors", "pilot_hpc.sections")}


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_the_bottom_imports_only_what_it_names(leaf):
    extra = sorted(import_graph()[leaf] - set(LEAVES[leaf]) - {"pilot_hpc"})
    assert not extra, f"{leaf} imports {extra}: it must load with the standard library and PyYAML only"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downwards(layer):
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if m == layer or m.startswith(layer + ".")
                 for d in deps if any(d == f or d.startswith(f) for f in FORBIDDEN[layer]) and d != "pilot_hpc")
    assert not bad, f"{layer} imports upwards: {bad}"


def test_the_kernels_are_a_leaf():
    """pilot_hpc_kernels imports nothing of pilot_hpc: its types live with it."""
    graph = import_graph()
    bad = sorted((m, d) for m, deps in graph.items() if m.startswith("pilot_hpc_kernels")
                 for d in deps if not d.startswith("pilot_hpc_kernels"))
    assert not bad, f"kernels import pilot_hpc: {bad}"
    assert "pilot_hpc_kernels.ctmoa_reference" in graph["pilot_hpc.model.ctmoa"]


_FIND_KERNELS = "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else '')"


def test_the_repository_root_shadows_no_installed_package():
    """transformers >= 5.25 requires the PyPI project `kernels` and imports it: a `kernels`
    package or module at the repository root (on sys.path under `python -m ...` started
    there) would be found first and break every model import (CI, 2026-12-03). kernels/
    holds tests only, in no package named `kernels`."""
    assert not os.path.exists(os.path.join(REPO, "kernels", "__init__.py"))
    origin = subprocess.run([sys.executable, "-c", _FIND_KERNELS], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    # The installed project's file (a venv may sit inside the repository), or nothing with a
    # file (not installed: at most the folder as a namespace portion, origin None); never a
    # file the root itself provides (kernels.py, kernels/__init__.py).
    root = os.path.realpath(REPO)
    assert origin in ("", "None") or os.path.dirname(os.path.realpath(origin)) not in (root, os.path.join(
        root, "kernels")), origin
    # Where the project is installed, pytest must not have put a module of ours under its name.
    mod = sys.modules.get("kernels")
    if mod is not None and importlib.util.find_spec("kernels").origin:
        assert getattr(mod, "__file__", None) == importlib.util.find_spec("kernels").origin, mod
