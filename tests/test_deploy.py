"""What ships in deploy/: the systemd unit, the example config, the Postfix lines."""

from __future__ import annotations

import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest

from spamgate.app import loads

from .conftest import issue, need_binary

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "spamgate.service"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
POSTCONF = "/usr/sbin/postconf"


def need_systemd_analyze() -> None:
    """systemd-analyze is not one of CI's required binaries: absent, the test skips."""
    if not os.path.exists(SYSTEMD_ANALYZE):
        pytest.skip(f"systemd-analyze not installed ({SYSTEMD_ANALYZE})")


def unit_with_binary(tmp_path: pathlib.Path) -> pathlib.Path:
    """The unit as shipped, with /opt/spamgate/bin pointing at a stand-in program.

    `systemd-analyze verify` checks that ExecStart names an executable; spamgate
    is not installed in /opt here, and nothing else in the unit is changed.
    """
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "spamgate"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    text = UNIT.read_text()
    assert text.count("/opt/spamgate/bin/spamgate") == 3
    unit = tmp_path / "spamgate.service"
    unit.write_text(text.replace("/opt/spamgate/bin/spamgate", str(exe)))
    return unit


def test_systemd_unit_verifies(tmp_path) -> None:
    need_systemd_analyze()
    unit = unit_with_binary(tmp_path)
    r = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "spamgate.service" not in r.stderr, r.stderr  # no warning about our unit


def test_systemd_unit_is_hardened(tmp_path) -> None:
    need_systemd_analyze()
    unit = unit_with_binary(tmp_path)
    # systemd's own exposure score: 0 is locked down, 10 is a plain root service.
    r = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    text = UNIT.read_text()
    for line in (
        "User=spamgate",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Type=notify",
    ):
        assert line in text.splitlines(), line


def test_example_config_is_valid(ca, tmp_path) -> None:
    etc = tmp_path / "spamgate"
    (etc / "tls").mkdir(parents=True)
    shutil.copy(DEPLOY / "spamgate.toml", etc / "spamgate.toml")
    # the install step copies the shipped rules (docs/deploy.md, step 1)
    shutil.copytree(ROOT / "rules", etc / "rules", ignore=shutil.ignore_patterns("*.toml"))
    files = issue(ca, etc / "tls", "mx.example.com")
    shutil.move(files.cert, etc / "tls" / "fullchain.pem")
    shutil.move(files.key, etc / "tls" / "privkey.pem")
    r = subprocess.run(
        [sys.executable, "-m", "spamgate", "check", "-c", str(etc / "spamgate.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = loads((etc / "spamgate.toml").read_text(), str(etc / "spamgate.toml"))
    assert [lst.address for lst in cfg.listeners] == ["0.0.0.0:25", "[::]:25"]
    assert cfg.server.mode == "monitor"  # a rollout starts by watching
    assert cfg.upstream.address == "127.0.0.1:10025"
    assert cfg.section("spf").enabled
    # the production settings (docs/deploy.md): a worker per core less one,
    # connections to Postfix reused (which the shipped master.cf line allows),
    # metrics on loopback
    assert cfg.server.workers == max(1, len(os.sched_getaffinity(0)) - 1)
    assert cfg.upstream.pool_size == 16
    assert cfg.metrics.listen == "127.0.0.1:9587"


def test_postfix_lines_parse_as_shipped(tmp_path) -> None:
    need_binary(POSTCONF, "Postfix (postconf)")
    (tmp_path / "main.cf").write_text((DEPLOY / "postfix" / "main.cf").read_text())
    (tmp_path / "master.cf").write_text((DEPLOY / "postfix" / "master.cf").read_text())
    r = subprocess.run(
        [POSTCONF, "-c", str(tmp_path), "-P"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "127.0.0.1:10025/inet/smtpd_authorized_xclient_hosts = static:all",
        "127.0.0.1:10025/inet/smtpd_forbid_bare_newline = reject",
        "127.0.0.1:10025/inet/smtpd_forbid_bare_newline_exclusions =",
        "127.0.0.1:10025/inet/smtpd_upstream_proxy_protocol =",
        "127.0.0.1:10025/inet/syslog_name = postfix/spamgate",
    ]
    r = subprocess.run(
        [POSTCONF, "-c", str(tmp_path), "-M"], capture_output=True, text=True, timeout=30
    )
    # one service only, and it is smtpd (not postscreen) on loopback
    assert [line.split()[:8] for line in r.stdout.splitlines()] == [
        ["127.0.0.1:10025", "inet", "n", "-", "y", "-", "-", "smtpd"]
    ]
    # main.cf changes nothing: every setting is scoped to the listener
    r = subprocess.run(
        [POSTCONF, "-c", str(tmp_path), "-n"], capture_output=True, text=True, timeout=30
    )
    set_here = [line for line in r.stdout.splitlines() if not line.startswith("config_directory")]
    assert set_here == []


def test_milter_example_config_is_valid(tmp_path) -> None:
    etc = tmp_path / "spamgate"
    etc.mkdir()
    shutil.copy(DEPLOY / "spamgate-milter.toml", etc / "spamgate.toml")
    shutil.copytree(ROOT / "rules", etc / "rules", ignore=shutil.ignore_patterns("*.toml"))
    r = subprocess.run(
        [sys.executable, "-m", "spamgate", "check", "-c", str(etc / "spamgate.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = loads((etc / "spamgate.toml").read_text(), str(etc / "spamgate.toml"))
    assert cfg.listeners == ()  # Postfix keeps port 25
    assert cfg.milter.listen == ["inet:127.0.0.1:11332"]
    assert cfg.server.mode == "monitor" and cfg.smtp.delay_reject
    # spamgate's deadlines are Postfix's timeouts as shipped in milter.cf
    main = dict(
        line.split(" = ", 1)
        for line in (DEPLOY / "postfix" / "milter.cf").read_text().splitlines()
        if " = " in line and not line.startswith("#")
    )
    assert main["smtpd_milters"] == cfg.milter.listen[0]
    assert f"{cfg.milter.command_timeout:g}s" == main["milter_command_timeout"]
    assert f"{cfg.milter.content_timeout:g}s" == main["milter_content_timeout"]
    assert main["milter_default_action"] == "tempfail"


def test_milter_lines_parse_as_shipped(tmp_path) -> None:
    need_binary(POSTCONF, "Postfix (postconf)")
    (tmp_path / "main.cf").write_text((DEPLOY / "postfix" / "milter.cf").read_text())
    (tmp_path / "master.cf").write_text("")
    r = subprocess.run(
        [POSTCONF, "-c", str(tmp_path), "-n"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    set_here = [line for line in r.stdout.splitlines() if not line.startswith("config_directory")]
    assert set_here == [
        "milter_command_timeout = 30s",
        "milter_connect_timeout = 30s",
        "milter_content_timeout = 300s",
        "milter_default_action = tempfail",
        "milter_protocol = 6",
        "smtpd_milters = inet:127.0.0.1:11332",
    ]
