"""Configuration loading, errors as file:line, the CLI, and the README reference."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from spamgate.app import load, loads
from spamgate.cli import END, START, reference_markdown
from spamgate.config.settings import ConfigError

from ..conftest import spamgate_cli

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return spamgate_cli(*args, timeout=timeout)


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
    bad.write_text("[server]\nworkers = -1\n")
    r = run_cli("check", "-c", str(bad))
    assert r.returncode == 1
    assert r.stdout.strip() == f"{bad}:2: [server] workers: must not be negative"
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


def test_config_reference_update_refuses_what_it_cannot_rewrite(tmp_path) -> None:
    missing = tmp_path / "nothere.md"
    r = run_cli("config-reference", "--update", str(missing))
    assert (r.returncode, r.stdout, r.stderr) == (1, "", f"spamgate: {missing}: no such file\n")
    assert not missing.exists()
    r = run_cli("config-reference", "--update", str(tmp_path))
    assert (r.returncode, r.stderr) == (1, f"spamgate: {tmp_path}: is a directory, not a file\n")
    plain = tmp_path / "plain.md"
    for text in ("# notes\n", f"# notes\n{START}\nonly the start\n", f"{END}\n{START}\n"):
        plain.write_text(text)
        r = run_cli("config-reference", "--update", str(plain))
        assert (r.returncode, r.stderr) == (
            1,
            f"spamgate: {plain}: no {START} ... {END} block to rewrite "
            "(add the two lines where it belongs)\n",
        )
        assert plain.read_text() == text  # nothing appended


def test_config_reference_update_rewrites_the_block(tmp_path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"# head\n{START}\nold\n{END}\ntail\n")
    r = run_cli("config-reference", "--update", str(doc))
    assert (r.returncode, r.stderr) == (0, "")
    assert doc.read_text() == f"# head\n{START}\n{reference_markdown()}\n{END}\ntail\n"


def test_unknown_log_level_is_refused() -> None:
    r = run_cli("run", "--log-level", "bogus")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == (
        'spamgate run: error: argument --log-level: "bogus" is not one of '
        "debug, info, warning, error"
    )


def test_table_entries_are_reported_at_their_own_line(tmp_path) -> None:
    text = (
        "[ratelimit]\n"  # 1
        'messages_per_ip = "10/1m"\n'
        "\n"
        "[ratelimit.overrides]\n"  # 4
        '"cidr:a.cidr" = "unlimited"\n'
        '"cidr:b.cidr" = "messages_per_ip=lots"\n'  # 6
        "'hash:c' = \"recipients_per_ip=off, bogus=1/1m\"\n"  # 7
        '\n[spf]\nactions = { fail = "reject", neutral = "boom" }\n'  # 10
        '\n[dnsbl]\nsymbols.OK_NAME = "bl.test"\n'
        'symbols."bad name" = "bl.test"\n'  # 14
    )
    with pytest.raises(ConfigError) as err:
        loads(text, "o.toml")
    assert err.value.problems == [
        'o.toml:6: [ratelimit] overrides: "cidr:b.cidr": "lots" is not "COUNT/PERIOD" like '
        '"30/1m", "100/1h" or "5/30s"',
        "o.toml:7: [ratelimit] overrides: \"hash:c\": 'bogus' is not a rate limit "
        "(connections_per_ip, connections_per_net, recipients_per_ip, recipients_per_net, "
        "recipients_per_sender_domain, messages_per_recipient, messages_per_ip, "
        "messages_per_net, messages_per_sender_domain)",
        "o.toml:10: [spf] actions: expected 'continue' or 'score' or 'reject' or 'tempfail', "
        "got 'boom'",
        'o.toml:14: [dnsbl] symbols: "bad name" is not a symbol name (letters, digits, "_")',
    ]


def test_missing_client_tables_are_reported_at_the_config_line(tmp_path, monkeypatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "spamgate.toml").write_text(
        "[ratelimit]\n"
        'messages_per_ip = "10/1m"\n'
        "[ratelimit.overrides]\n"
        '"cidr:partners.cidr" = "unlimited"\n'  # 4
        '"cidr:rules/nothere.cidr" = "unlimited"\n'  # 5
        "\n[greylist]\nenabled = true\n"
        'allowlist = ["cidr:greylist.cidr"]\n'  # 9
    )
    (etc / "partners.cidr").write_text("192.0.2.0/24 OK\n")
    monkeypatch.chdir(tmp_path)
    r = run_cli_here("check", "-c", "etc/spamgate.toml")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "etc/spamgate.toml:5: [ratelimit] overrides: etc/rules/nothere.cidr: no such file",
        "etc/spamgate.toml:9: [greylist] allowlist: etc/greylist.cidr: no such file",
    ]


def run_cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command, in this test's working directory."""
    return subprocess.run(
        [sys.executable, "-m", "spamgate", *args], capture_output=True, text=True, timeout=30
    )


def test_check_reports_every_problem_at_once_with_resolved_paths(tmp_path) -> None:
    (tmp_path / "deploy" / "rules").mkdir(parents=True)
    cfg = tmp_path / "deploy" / "spamgate.toml"
    cfg.write_text(
        '[server]\nhostname = "mx.example.test"\nworkers = -1\n'  # 3
        '\n[tls]\ncert_file = "tls/cert.pem"\nkey_file = "tls/key.pem"\n'  # 6, 7
        '\n[rules]\nclient = ["cidr:rules/client.cidr"]\n'  # 10
        'helo = ["regexp:rules/helo.regexp"]\n'  # 11
    )
    (tmp_path / "deploy" / "rules" / "helo.regexp").write_text("/x/ REJCT\n")
    r = subprocess.run(
        [sys.executable, "-m", "spamgate", "check", "-c", "deploy/spamgate.toml"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "deploy/spamgate.toml:3: [server] workers: must not be negative",
        "deploy/spamgate.toml:10: [rules] client: deploy/rules/client.cidr: no such file",
        "deploy/rules/helo.regexp:1: unknown action 'REJCT' (expected OK, DUNNO, REJECT, "
        "DEFER, 4NN/5NN text, DISCARD, HOLD, PREPEND, WARN or SCORE)",
        "deploy/spamgate.toml:6: [tls] cert_file deploy/tls/cert.pem: no such file",
        "deploy/spamgate.toml:7: [tls] key_file deploy/tls/key.pem: no such file",
    ]
    # from elsewhere, a path is shown absolute when that is shorter than going up
    r = run_cli("check", "-c", str(cfg))
    assert r.stdout.splitlines()[1] == (
        f"{cfg}:10: [rules] client: {tmp_path}/deploy/rules/client.cidr: no such file"
    )
    # `run` refuses to start with the same list
    r = run_cli("run", "-c", str(cfg))
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 5
    assert r.stderr.splitlines()[4] == (
        f"spamgate: {cfg}:7: [tls] key_file {tmp_path}/deploy/tls/key.pem: no such file"
    )


NOT_FQDN = (
    "is not a fully qualified domain name: set [server] hostname to this MX's public "
    'name (spamgate greets clients with it, and a ${myhostname} HELO rule such as "You are '
    'not me" refuses clients that say it)'
)


@pytest.mark.parametrize("name", ["localhost", "mx", "localhost.localdomain", "mx.localhost."])
def test_check_warns_of_a_hostname_that_is_not_a_fqdn(tmp_path, name) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\nrelay_domains = ["example.test"]\nhostname = "{name}"\n')
    r = run_cli("check", "-c", str(cfg))
    assert r.returncode == 0  # a warning, not an error
    assert r.stdout.splitlines() == [
        f'{cfg}:3: warning: [server] hostname "{name}" {NOT_FQDN}',
        f"{cfg}: ok",
    ]


def test_check_is_quiet_about_a_fqdn(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nhostname = "mx.example.test"\n')
    r = run_cli("check", "-c", str(cfg))
    assert (r.returncode, r.stdout) == (0, f"{cfg}: ok\n")


def test_run_warns_of_a_hostname_that_is_not_a_fqdn(tmp_path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nlisten = ["127.0.0.1:0"]\nhostname = "localhost"\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "spamgate", "run", "-c", str(cfg)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # the warning comes before "listening"
            lines.append(line)
            if "spamgate listening on" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    warnings = [line for line in lines if " WARNING spamgate: [server] hostname" in line]
    assert len(warnings) == 1, lines
    assert warnings[0].rstrip().endswith(f'[server] hostname "localhost" {NOT_FQDN}')


def test_workers_zero_means_one_per_core_less_one() -> None:
    cores = len(os.sched_getaffinity(0))
    assert loads("[server]\nworkers = 0\n").server.workers == max(1, cores - 1)
    assert loads("[server]\nworkers = 3\n").server.workers == 3


def test_display_path_is_relative_only_below_the_working_directory(tmp_path, monkeypatch) -> None:
    """Errors name a file so that it opens from where the command ran: relative when
    it lies below the working directory, whole when a relative form would climb out
    (it would change with the working directory, and CI runs from anywhere)."""
    from spamgate.config.settings import display_path

    (tmp_path / "etc" / "rules").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "etc")
    assert display_path(str(tmp_path / "etc" / "rules" / "client.cidr")) == "rules/client.cidr"
    assert display_path(str(tmp_path / "other.cidr")) == str(tmp_path / "other.cidr")
    assert display_path("/") == "/"
