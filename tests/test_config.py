"""Configuration loading, errors as file:line, the CLI, and the README reference."""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys

import pytest

from spamgate.cli import END, START, reference_markdown
from spamgate.config import load, loads
from spamgate.settings import ConfigError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spamgate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_defaults_need_no_file() -> None:
    cfg = load(None)
    assert cfg.server.listen == ["127.0.0.1:2525"]
    assert cfg.upstream.address.startswith("maildir:")
    assert cfg.limits.message_size == 10240000
    assert cfg.server.mode == "enforce"


def test_errors_name_file_and_line(tmp_path) -> None:
    text = (
        '[server]\nlisten = ["127.0.0.1:25"]\nmode = "loud"\n\n'
        '[limits]\nrecipients = "many"\nfoo = 1\n'
    )
    with pytest.raises(ConfigError) as err:
        loads(text, "x.toml")
    assert err.value.problems == [
        "x.toml:3: [server] mode: expected 'enforce' or 'monitor', got 'loud'",
        "x.toml:6: [limits] recipients: expected an integer, got 'many'",
        "x.toml:7: unknown setting 'foo' in [limits]",
    ]


def test_syntax_error_has_a_line() -> None:
    with pytest.raises(ConfigError) as err:
        loads("[server]\nlisten = [\n", "y.toml")
    assert err.value.problems[0].startswith("y.toml:")


def test_bad_values() -> None:
    with pytest.raises(ConfigError) as err:
        loads('[upstream]\naddress = "nohost"\n[server]\nmynetworks = ["10.0.0.0/33"]\n', "z.toml")
    assert any("z.toml:2:" in p and "host:port" in p for p in err.value.problems)
    assert any("z.toml:4:" in p and "IP network" in p for p in err.value.problems)


def test_relay_domains_must_have_an_a_label_form() -> None:
    cfg = loads('[server]\nrelay_domains = ["B\u00c4NK.test", ".sub.example.test"]\n', "r.toml")
    assert cfg.server.relay_domains == ["B\u00c4NK.test", ".sub.example.test"]
    with pytest.raises(ConfigError) as err:
        loads('[server]\nrelay_domains = ["bad\u2028name.test"]\n', "r.toml")
    assert "is not a domain" in err.value.problems[0]


def test_check_command(tmp_path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[server]\nrelay_domains = ["example.test"]\n')
    r = run_cli("check", "-c", str(good))
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nworkers = 0\n")
    r = run_cli("check", "-c", str(bad))
    assert r.returncode == 1
    assert r.stdout.strip() == f"{bad}:2: [server] workers: must be greater than 0"
    assert "Traceback" not in r.stderr


def test_missing_file() -> None:
    r = run_cli("run", "-c", "/nonexistent/spamgate.toml")
    assert r.returncode == 1
    assert "/nonexistent/spamgate.toml: no such file" in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use(tmp_path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n')
    try:
        r = run_cli("run", "-c", str(cfg))
    finally:
        busy.close()
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_readme_reference_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == reference_markdown().strip(), (
        "README configuration reference is stale: "
        "run `spamgate config-reference --update README.md`"
    )
