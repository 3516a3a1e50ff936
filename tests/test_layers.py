"""The layering rules of ARCHITECTURE.md, checked on the source.

- relift_core never imports Prefect or MLflow (the orchestration layers sit above it).
- The algorithm's pure core (advantages and losses, strategies, the demonstration buffer,
  difficulty levels) depends on nothing else of relift_core but the config.
- Only the proof-world imports the proof-world: the method does not know the demo's world.
"""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "relift_core"
PURE_ALGORITHM = ["objectives", "strategies", "demonstration_buffer", "difficulty"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _relift_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("relift_core")
        ):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("relift_core"))
    return names


def test_relift_core_imports_neither_prefect_nor_mlflow():
    modules = sorted(_module_name(p) for p in CORE.rglob("*.py"))
    assert "relift_core.algorithm.objectives" in modules
    assert "relift_core.runtime.session" in modules
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"relift_core pulled in: {out.stdout.strip()}"


def test_algorithm_core_depends_only_on_itself_and_config():
    for name in PURE_ALGORITHM:
        imported = _relift_imports(CORE / "algorithm" / f"{name}.py")
        foreign = {
            m for m in imported if not m.startswith(("relift_core.algorithm", "relift_core.config"))
        }
        assert not foreign, f"relift_core.algorithm.{name} imports {sorted(foreign)}"


def test_only_the_proofworld_imports_the_proofworld():
    for path in CORE.rglob("*.py"):
        if path.parent.name == "proofworld":
            continue
        bad = {m for m in _relift_imports(path) if m.startswith("relift_core.proofworld")}
        assert not bad, f"{_module_name(path)} imports {sorted(bad)}"
