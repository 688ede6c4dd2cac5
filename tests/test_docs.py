"""What the documents promise, checked: they stand alone, and they agree.

A reader has this repository and nothing else, so no file in it may point at
material they do not have (the developers' notes and reference folders).
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", ".hypothesis", ".pytest_cache", ".ruff_cache", "build", "dist"}
TEXT = {".md", ".py", ".toml", ".cf", ".yml", ".yaml", ".json", ".service", ".sysusers", ""}


def project_files() -> list[pathlib.Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in TEXT and "__pycache__" not in rel.parts:
            out.append(path)
    return out


def test_nothing_cites_material_readers_do_not_have() -> None:
    unreadable = re.compile(r"PROTOCOL\.md|LIBRARIES\.md|\.\./shared|/work/(shared|notes)")
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in project_files()
        if path != pathlib.Path(__file__)
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if unreadable.search(line)
    ]
    assert found == []
