"""Listeners: `[server] listen` as it always was, `[[listener]]` tables with their own options."""

from __future__ import annotations

import pytest

from spamgate.app import loads
from spamgate.config import Listener
from spamgate.config.settings import ConfigError

TLS = '[tls]\ncert_file = "c.pem"\nkey_file = "k.pem"\n'


def test_listen_alone_keeps_its_meaning() -> None:
    cfg = loads('[server]\nlisten = ["0.0.0.0:25", "[::]:25"]\nproxy_protocol = true\n')
    assert cfg.listeners == (
        Listener("0.0.0.0:25", proxy_protocol=True),
        Listener("[::]:25", proxy_protocol=True),
    )


def test_listener_tables_inherit_server_options() -> None:
    cfg = loads(
        '[server]\nlisten = ["0.0.0.0:25"]\nproxy_protocol = true\n\n'
        '[[listener]]\naddress = "0.0.0.0:587"\nproxy_protocol = false\nrequire_tls = true\n'
        "auth_passthrough = true\n\n"
        '[[listener]]\naddress = "127.0.0.1:2526"\n\n'
        '[upstream]\naddress = "127.0.0.1:10025"\n\n' + TLS
    )
    assert cfg.listeners == (
        Listener("0.0.0.0:25", proxy_protocol=True),
        Listener("0.0.0.0:587", require_tls=True, auth_passthrough=True),
        Listener("127.0.0.1:2526", proxy_protocol=True),
    )


def test_only_listener_tables_means_no_default_listen() -> None:
    cfg = loads('[[listener]]\naddress = "127.0.0.1:25"\n')
    assert [lst.address for lst in cfg.listeners] == ["127.0.0.1:25"]
    assert [lst.address for lst in loads("").listeners] == ["127.0.0.1:2525"]


def test_listener_errors_name_the_right_table() -> None:
    text = (
        '[[listener]]\naddress = "127.0.0.1:25"\n\n'  # 1-3
        '[[listener]]\naddress = "127.0.0.1:587"\nrequire_tls = "yes"\n\n'  # 4-7
        "[[listener]]\nauth_passthrough = true\n\n"  # 8-10
        '[[listener]]\naddress = "127.0.0.1:25"\n'  # 11-12
    )
    with pytest.raises(ConfigError) as err:
        loads(text, "l.toml")
    assert err.value.problems == [
        "l.toml:6: [listener] require_tls: expected true or false",
        "l.toml:8: [[listener]] needs an address",
        'l.toml:12: "127.0.0.1:25" is listed twice',
    ]


def test_auth_passthrough_needs_tls_and_an_smtp_upstream() -> None:
    with pytest.raises(ConfigError) as err:
        loads('[server]\nlisten = ["127.0.0.1:25"]\nauth_passthrough = true\n', "a.toml")
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [
        "127.0.0.1:25: auth_passthrough needs [tls] cert_file and key_file "
        "(AUTH is only offered after STARTTLS)",
        "127.0.0.1:25: auth_passthrough needs an SMTP upstream that checks passwords",
    ]


def test_auth_mechanisms_are_ones_we_can_follow() -> None:
    with pytest.raises(ConfigError) as err:
        loads('[auth]\nmechanisms = ["PLAIN", "CRAM-MD5"]\n', "m.toml")
    assert err.value.problems == [
        'm.toml:2: [auth] mechanisms: "CRAM-MD5" is not one of PLAIN, LOGIN'
    ]


def test_tls_needs_both_files() -> None:
    with pytest.raises(ConfigError) as err:
        loads('[tls]\ncert_file = "c.pem"\n', "t.toml")
    assert err.value.problems == ["t.toml:1: [tls] needs both cert_file and key_file"]
