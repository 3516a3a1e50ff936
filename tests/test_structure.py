"""relift_core's modules import each other without a circle.

A circle is what forces an import into a function body (or behind TYPE_CHECKING) to dodge a
partly-initialised module, and it hides which module owns an idea. The graph is read from the
source: every `import` and `from ... import` of a relift_core module, at module level and inside
functions alike (a deferred import is still a dependency); only imports under
`if TYPE_CHECKING:` are left out, as they never run.
"""

import ast
import re
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "relift_core"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.AST) -> list[str]:
    """Dotted names imported anywhere in `tree`, except under `if TYPE_CHECKING:`. A
    `from a.b import c` yields both `a.b` and `a.b.c` (c may be a submodule)."""
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(root: Path = CORE) -> dict[str, set[str]]:
    """module -> the relift_core modules it imports (module- and function-level)."""
    paths = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for imported in _imported_names(ast.parse(path.read_text(), filename=str(path))):
            if imported in paths and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None. Depth-first, three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones(tmp_path):
    pkg = tmp_path / "relift_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from relift_core.b import g\n")
    (pkg / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import relift_core.c\n"
        "from relift_core import a\n"
    )
    (pkg / "c.py").write_text("import relift_core.a\n")
    graph = import_graph(pkg)
    assert graph["relift_core.a"] == {"relift_core.b"}
    assert graph["relift_core.b"] == {"relift_core", "relift_core.a"}
    assert find_cycle(graph) == ["relift_core.a", "relift_core.b", "relift_core.a"]
    # b -> a under `typing.TYPE_CHECKING` is no edge; its else branch is one (b -> c -> a).
    (pkg / "b.py").write_text(
        "import typing\nif typing.TYPE_CHECKING:\n    from relift_core.a import f\n"
        "else:\n    import relift_core.c\n"
    )
    graph = import_graph(pkg)
    assert graph["relift_core.b"] == {"relift_core.c"}
    assert find_cycle(graph) == ["relift_core.a", "relift_core.b", "relift_core.c", "relift_core.a"]
    (pkg / "c.py").write_text("")
    assert find_cycle(import_graph(pkg)) is None


def test_relift_core_has_no_import_circle():
    graph = import_graph()
    # The graph holds the whole library, deferred imports included (Ray ranks, vLLM).
    assert "relift_core.runtime.vllm_engine" in graph["relift_core.runtime.assembly"]
    assert "relift_core.runtime.ray_cluster" in graph["relift_core.runtime.session"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle in relift_core: " + " -> ".join(cycle)


def _documented_files() -> set[str]:
    """Every `name.py` ARCHITECTURE.md names, as a bare file name."""
    text = (CORE.parent / "ARCHITECTURE.md").read_text()
    return {Path(m).name for m in re.findall(r"[\w/]+\.py\b", text)}


def test_architecture_names_every_module_and_only_modules_that_exist():
    """ARCHITECTURE.md's map is the tree: each module of relift_core, flows, tasks and analysis
    is named there, and each file it names exists (a rename or a new module updates it)."""
    repo = CORE.parent
    packages = ("relift_core", "flows", "tasks", "analysis")
    modules = {
        p.name
        for package in packages
        for p in (repo / package).rglob("*.py")
        if p.stem != "__init__"
    }
    tree = {p.name for p in repo.rglob("*.py") if ".venv" not in p.parts}
    documented = _documented_files()
    assert not modules - documented, (
        f"modules ARCHITECTURE.md does not name: {modules - documented}"
    )
    assert not documented - tree, (
        f"files ARCHITECTURE.md names that do not exist: {documented - tree}"
    )
