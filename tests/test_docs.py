"""What the documents promise, checked: they stand alone, and they agree.

A reader has this repository and nothing else, so no file in it may point at
material they do not have (the developers' notes and reference folders).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import yaml

from spamgate.app import loads

from .conftest import need_binary

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMTOOL = "/usr/bin/promtool"
SKIP_DIRS = {".git", ".venv", ".hypothesis", ".pytest_cache", ".ruff_cache", "build", "dist"}
TEXT = {".md", ".py", ".toml", ".cf", ".yml", ".yaml", ".json", ".service", ".sysusers", ""}


def project_files() -> list[pathlib.Path]:
    out = []
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [
            d for d in dirs if d not in SKIP_DIRS and d != "__pycache__" and ".egg-info" not in d
        ]
        out += [pathlib.Path(top, f) for f in files if pathlib.Path(f).suffix in TEXT]
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


def doc_files() -> list[pathlib.Path]:
    return [
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file()),
        *sorted((ROOT / "grafana").rglob("*.yml")),
    ]


def test_one_metrics_address_on_loopback_everywhere() -> None:
    """deploy/ and every document name the same metrics port, always on loopback."""
    deployed = loads((ROOT / "deploy" / "spamgate.toml").read_text()).metrics.listen
    assert deployed == "127.0.0.1:9587"
    others = {"9090": "Prometheus itself", "9100": "node_exporter"}
    seen = set()
    for path in doc_files():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for host, port in re.findall(r"([\w.\-\[\]:]*?):(9\d{3})\b", line):
                if port in others:
                    continue
                where = f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                assert f"{host}:{port}" == deployed, where
                seen.add(path.name)
    assert {"README.md", "monitoring.md", "deploy.md", "spamgate.toml"} <= seen


def test_scrape_example_is_a_valid_prometheus_config(tmp_path) -> None:
    need_binary(PROMTOOL, "promtool (Debian package prometheus)")
    text = (ROOT / "docs" / "monitoring.md").read_text()
    (example,) = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:] if "scrape_" in b]
    config = yaml.safe_load(example)
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "spamgate"  # what SpamgateDown expects
    deployed = loads((ROOT / "deploy" / "spamgate.toml").read_text()).metrics.listen
    assert job["static_configs"] == [{"targets": [deployed]}]
    rules = ROOT / "grafana" / "prometheus"
    assert [pathlib.Path(f).name for f in config["rule_files"]] == [
        "spamgate-recording.yml",
        "spamgate-alerts.yml",
    ]
    config["rule_files"] = [str(rules / pathlib.Path(f).name) for f in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = subprocess.run(
        [PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_readme_names_every_package_ci_installs() -> None:
    """The README's list of what the tests need besides Python is `.ci/run`'s."""
    ci = (ROOT / ".ci" / "run").read_text()
    listed = re.search(r"^pkgs=\(([^)]*)\)", ci, re.MULTILINE)
    assert listed, "no pkgs=(...) in .ci/run"
    packages = set(listed.group(1).split())
    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("Besides Python") :].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z0-9][a-z0-9.+-]*)`", paragraph))
    # python3-venv is in the set-up text above the commands, not in this list.
    assert packages - {"python3-venv"} == named, paragraph
    assert "install python3-venv" in readme


# A path to a module or script: "spamgate/ops/server.py", "tests/kit/postfix.py",
# or as the documents also write them, from the package ("flow/driver.py") or the
# module's own folder ("engines/clamd.py"); "::test_name" may follow.
PY_PATH = re.compile(r"(?<![\w./-])((?:[\w-]+/)+[\w-]+\.py)(?:::(\w+))?")
# Any file or folder of ours a Markdown document names, in backticks.
TOP = "spamgate|tests|bench|docs|deploy|grafana|rules"
BACKTICKED = re.compile(rf"`((?:{TOP})/[^`\s:*]*)`")


def test_every_file_a_document_names_exists() -> None:
    """The renovation moved most files: every path the documents, .ci/run, the
    shipped files and the modules' docstrings and comments name is there, and
    every test they cite (`tests/e2e/test_tls.py::test_name`) is in it."""
    markdown = [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]
    texts = [
        *markdown,
        ROOT / ".ci" / "run",
        *(p for p in (ROOT / "deploy").rglob("*") if p.is_file()),
        *(p for d in ("spamgate", "bench", "tests") for p in (ROOT / d).rglob("*.py")),
    ]
    texts.remove(pathlib.Path(__file__))  # its own examples
    missing, named = [], 0
    for path in texts:
        bases = [ROOT, ROOT / "spamgate", path.parent, path.parent.parent]
        for n, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{n}"
            for m in PY_PATH.finditer(line):
                named += 1
                name, test = m.groups()
                found = [b / name for b in bases if (b / name).is_file()]
                if not found:
                    missing.append(f"{where}: {name}")
                elif test and not re.search(rf"def {test}\b", found[0].read_text()):
                    missing.append(f"{where}: {name}::{test}")
            if path in markdown:
                for m in BACKTICKED.finditer(line):
                    name = m.group(1)
                    named += 1
                    # modules are PY_PATH's; a Maildir is made where spamgate runs
                    if name.endswith(".py") or "maildir" in name:
                        continue
                    if not (ROOT / name).exists():
                        missing.append(f"{where}: {name}")
    assert named > 100  # the patterns still find what the documents write
    assert not missing, "\n".join(missing)


def test_no_document_sends_the_reader_to_an_issue() -> None:
    """Readers have the repository, not its issue tracker: a heading or docstring
    says what a benchmark measures or what a test proves, never "issue 15"."""
    texts = [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "bench").iterdir(),
        *(p for p in (ROOT / "deploy").rglob("*") if p.is_file()),
        *(ROOT / "spamgate").rglob("*.py"),
    ]
    cited = re.compile(r"\bissues? ?#?\d+", re.IGNORECASE)
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in texts
        if path.is_file() and path.suffix in (".md", ".py", ".toml", ".cf", ".service")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if cited.search(line)
    ]
    assert not found, "\n".join(found)
