"""The plan of the house holds: imports point down the layers, and no spamgate
module is imported inside a function except where start-up time asks for it.

The layers themselves are import-linter's contract ([tool.importlinter] in
pyproject.toml), which `.ci/run` runs; this test keeps the lazy imports (which
hide cycles from a reader and import-linter alike) to the deliberate ones.
"""

from __future__ import annotations

import ast
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "spamgate"

# Imported when needed, on purpose: each `spamgate` subcommand loads only what it
# uses (query never loads the checks, check never the server), and the Redis
# client is loaded only by a configuration that names Redis.
DELIBERATE = {"cli.py", "state/__init__.py"}


def lazy_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = str(path.relative_to(PACKAGE))
        if where in DELIBERATE:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.ImportFrom)
                    and (sub.level > 0 or (sub.module or "").startswith("spamgate"))
                ) or (
                    isinstance(sub, ast.Import)
                    and any(a.name.startswith("spamgate") for a in sub.names)
                ):
                    found.append(f"{where}:{sub.lineno}")
    return found


def test_no_module_of_spamgate_is_imported_inside_a_function() -> None:
    assert lazy_imports() == []


def test_the_layers_contract_holds() -> None:
    lint = shutil.which("lint-imports") or str(ROOT / ".venv" / "bin" / "lint-imports")
    if not pathlib.Path(lint).exists():
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    r = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
