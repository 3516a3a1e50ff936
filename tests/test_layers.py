"""The layering rule of ARCHITECTURE.md: relift_core never imports Prefect or MLflow."""

import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "relift_core"


def test_relift_core_imports_neither_prefect_nor_mlflow():
    modules = sorted(f"relift_core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"relift_core pulled in: {out.stdout.strip()}"
