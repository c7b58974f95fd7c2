"""Only the in-sandbox package is mounted into a stage, and the layers import downward only.

`/pipcook/lib` inside a real stage holds exactly the `sandbox` subpackage
(worker, SDK, context, protocol, boundary, ring, extract): no host-side code
(backends, runner, the confinement's own settings) is readable by a script.
And, read from the source: nothing under `sandbox/` imports host code, and
nothing under `runner/backends/` imports the layers above it.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import REPO

from .attack import run_attack

pytestmark = pytest.mark.hostile

LIST_LIB = '''
import json
import os


def train(runtime, options, ctx):
    found = []
    for dirpath, dirnames, filenames in os.walk("/pipcook/lib"):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), "/pipcook/lib"))
    print("REPORT", json.dumps(sorted(found)), flush=True)
'''


def _package_files() -> list[str]:
    root = REPO / "sandbox"
    return sorted(f"sandbox/{p.relative_to(root)}" for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


def test_the_stage_mount_holds_only_the_in_sandbox_package(tmp_path, isolation):
    attack = run_attack(tmp_path, isolation, model=LIST_LIB)
    assert attack.returncode == 0, attack.describe()
    listed = attack.reports("model")
    assert listed == _package_files(), json.dumps(listed)
    assert not [p for p in listed if "backends" in p or p.startswith("runner")]


def _imports(path: Path) -> list[tuple[int, str]]:
    """(level, module) of every import in a file; level > 0 for relative ones."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.level, node.module or ""))
    return found


def test_in_sandbox_code_imports_nothing_host_side():
    for path in sorted((REPO / "sandbox").rglob("*.py")):
        for level, module in _imports(path):
            # inside a stage the package is the top-level `sandbox`: only relative imports, never upward
            assert level <= 1, f"{path}: relative import above the sandbox package ({'.' * level}{module})"
            assert not module.startswith(("pipcook_sandbox", "runner", "frameworks")), f"{path} imports {module}"


def test_backends_import_nothing_above_them():
    upward = ("commands", "orchestrator", "training", "predict", "serve", "cli", "control", "run")
    for path in sorted((REPO / "runner" / "backends").rglob("*.py")):
        for level, module in _imports(path):
            if level >= 2:  # from ..x: the runner package above the backends
                assert module.split(".")[0] not in upward, f"{path} imports ..{module}"
            name = module.removeprefix("pipcook_sandbox.runner.") if module.startswith("pipcook_sandbox.runner.") else ""
            assert name.split(".")[0] not in upward, f"{path} imports {module}"
            assert not module.startswith("pipcook_sandbox.runner.commands"), f"{path} imports {module}"
