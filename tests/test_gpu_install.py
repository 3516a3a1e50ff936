"""The `gpu` extra installs: its pins and constraints-gpu.txt resolve with pip (README "GPU").

The resolver test reads package metadata from PyPI (no wheel is installed or built beyond the
metadata pip needs), so a pin that drifts out of what vLLM, Prefect, MLflow and DeepSpeed accept
together fails here rather than on a researcher's GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


CPU_PINS = _pins(ROOT / "constraints.txt")
GPU_PINS = _pins(ROOT / "constraints-gpu.txt")


@pytest.mark.parametrize("pins", [CPU_PINS, GPU_PINS], ids=["cpu", "gpu"])
def test_base_dependencies_admit_both_verified_sets(pins):
    refused = []
    for spec in PYPROJECT["dependencies"]:
        req = Requirement(spec)
        version = pins.get(canonicalize_name(req.name))
        if version is not None and not req.specifier.contains(version, prereleases=True):
            refused.append(f"{spec} refuses {req.name}=={version}")
    assert not refused


def test_gpu_extra_is_pinned_to_the_constraint_set():
    extra = [Requirement(s) for s in PYPROJECT["optional-dependencies"]["gpu"]]
    assert {canonicalize_name(r.name) for r in extra} == {"vllm", "deepspeed"}
    for req in extra:
        assert str(req.specifier) == f"=={GPU_PINS[canonicalize_name(req.name)]}", req


def test_python_311_and_312_are_admitted():
    allowed = SpecifierSet(PYPROJECT["requires-python"])
    assert "3.11.7" in allowed and "3.12.1" in allowed


@pytest.mark.slow
def test_pip_resolves_the_gpu_install(tmp_path):
    """README's GPU line, as pip's resolver sees it: `pip install -c constraints-gpu.txt
    -e '.[gpu,cluster]'`, metadata only (`--dry-run`)."""
    report = tmp_path / "report.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--disable-pip-version-check",
        "--report",
        str(report),
        "-c",
        str(ROOT / "constraints-gpu.txt"),
        f"{ROOT}[gpu,cluster]",
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    resolved.pop("relift")
    # Everything the install brings is pinned, at the pinned version: nothing floats.
    assert {name: v for name, v in resolved.items() if GPU_PINS.get(name) != v} == {}
    for name in ("vllm", "deepspeed", "torch", "transformers", "fastapi", "prefect", "mlflow"):
        assert name in resolved
