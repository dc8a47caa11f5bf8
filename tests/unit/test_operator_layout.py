"""The operator's layout rule (operator/kubeforge/controllers/__init__.py): nothing imports a
``handlers.py`` but ``kubeforge.main``; a ``plan.py`` or ``manifests.py`` reaches neither kopf
nor the kubernetes client, even through other modules; no import cycle among the operator's
modules; only ``kubeforge.main`` reads the environment."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2] / "operator"
PACKAGE = ROOT / "kubeforge"
KINDS = ("trainingjob", "checkpointpolicy", "inferenceservice")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Every module ``name`` imports (at module level or in a function): ours by full name,
    third-party ones by their top-level name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from kubeforge.controllers import workload`` imports a module, not a name
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m if m.split(".")[0] == "kubeforge" else m.split(".")[0] for m in found}


def ours(name: str) -> set[str]:
    return {m for m in imports(name) if m in MODULES}


def reachable(name: str) -> set[str]:
    """Every module importing ``name`` loads (ours and third-party), with the packages
    above each of ours (Python runs their ``__init__`` first)."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        m = todo.pop()
        parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
        for dep in [*imports(m), *parents] if m in MODULES else []:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_every_kind_has_the_three_modules() -> None:
    for kind in KINDS:
        for part in ("plan", "manifests", "handlers"):
            assert f"kubeforge.controllers.{kind}.{part}" in MODULES, f"controllers/{kind}/{part}.py is missing"


def test_nothing_imports_a_handlers_module() -> None:
    importers = {name: sorted(m for m in imports(name) if m.endswith(".handlers"))
                 for name in MODULES}
    assert {k: v for k, v in importers.items() if v} == {}
    main = importlib.import_module("kubeforge.main")
    assert set(main.HANDLERS) == {m for m in MODULES if m.endswith(".handlers")}, "main must register every kind"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.endswith((".plan", ".manifests"))))
def test_pure_modules_reach_neither_kopf_nor_the_kubernetes_client(name: str) -> None:
    loaded = reachable(name)
    assert not loaded & {"kopf", "kubernetes"}, f"{name} loads {sorted(loaded & {'kopf', 'kubernetes'})}"
    assert not {m for m in loaded if m.endswith(".handlers") or m == "kubeforge.k8s"}


def test_no_import_cycle_between_operator_modules() -> None:
    graph = {name: ours(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [node, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_main_reads_the_environment() -> None:
    readers = sorted(name for name, path in MODULES.items()
                     if ("os.environ" in path.read_text() or "getenv(" in path.read_text())
                     and name not in ("kubeforge.main", "kubeforge.store.inspector"))
    assert readers == []
