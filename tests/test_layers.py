"""The layer check (import-linter contracts in pyproject.toml): the tree keeps them, and an upward import
breaks them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
PACKAGES = ("replicas", "kvstore", "router", "cluster", "load_tests", "tests")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # lint-imports puts its working directory first on sys.path, so it reads the packages under `root`.
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(root)})


def copy_sources(dst: Path) -> None:
    for package in PACKAGES:
        for src in (REPO / package).rglob("*.py"):
            out = dst / src.relative_to(REPO)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
    shutil.copyfile(REPO / "pyproject.toml", dst / "pyproject.toml")


def test_the_tree_keeps_the_layers():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_an_upward_import_breaks_the_check(tmp_path):
    copy_sources(tmp_path)
    assert lint_imports(tmp_path).returncode == 0  # the copy alone passes
    engine = tmp_path / "replicas" / "engine" / "sampler.py"
    engine.write_text(engine.read_text() + "\nimport ray  # noqa\n")
    cluster = tmp_path / "cluster" / "app.py"
    cluster.write_text(cluster.read_text() + "\n\ndef _late():\n    from load_tests import tiny_model  # noqa\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "replicas.engine is not allowed to import ray" in result.stdout
    assert "cluster is not allowed to import load_tests" in result.stdout  # a function-level import counts too
    assert "0 kept, 2 broken" in result.stdout


def test_the_engine_contract_names_every_serving_module_of_replicas():
    """The engine contract lists replicas' other modules one by one (import-linter cannot forbid a parent
    package to its own child); a new serving module must join the list."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    engine = next(c for c in config["contracts"] if c["id"] == "engine")
    serving = {f"replicas.{p.stem if p.is_file() else p.name}" for p in (REPO / "replicas").iterdir()
               if p.name not in ("__init__.py", "engine", "__pycache__") and (p.suffix == ".py" or p.is_dir())}
    assert serving <= set(engine["forbidden_modules"])
