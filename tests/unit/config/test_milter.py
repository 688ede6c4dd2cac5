"""`[milter]`: the milter's sockets as Postfix names them, and what it means for the
proxy's listeners."""

from __future__ import annotations

import pytest

from spamgate.app import loads
from spamgate.config import parse_milter_address
from spamgate.config.settings import ConfigError


def test_a_milter_alone_means_no_default_proxy_listener() -> None:
    cfg = loads('[milter]\nlisten = ["inet:127.0.0.1:11332"]\n')
    assert cfg.listeners == ()
    assert cfg.milter.enabled and cfg.milter.listen == ["inet:127.0.0.1:11332"]
    both = loads('[server]\nlisten = ["0.0.0.0:25"]\n[milter]\nlisten = ["inet:127.0.0.1:1"]\n')
    assert [lst.address for lst in both.listeners] == ["0.0.0.0:25"]
    assert not loads("").milter.enabled


def test_addresses() -> None:
    tcp = parse_milter_address("inet:127.0.0.1:11332")
    assert (tcp.unix, tcp.host, tcp.port) == (False, "127.0.0.1", 11332)
    v6 = parse_milter_address("inet:[::1]:11332")
    assert (v6.host, v6.port) == ("::1", 11332)
    unix = parse_milter_address("unix:/run/spamgate/milter.sock")
    assert unix.unix and unix.path == "/run/spamgate/milter.sock"
    for bad in ("127.0.0.1:11332", "inet:localhost:11332", "unix:relative.sock", "local:/x"):
        with pytest.raises(ValueError):
            parse_milter_address(bad)


def test_every_problem_reported_at_its_line() -> None:
    with pytest.raises(ConfigError) as exc:
        loads(
            "[milter]\n"
            'listen = ["inet:mx.example:11332"]\n'
            'socket_mode = "rw-rw----"\n'
            'socket_group = "no-such-group-here"\n'
            "command_timeout = 0\n"
        )
    assert exc.value.problems == [
        '<config>:2: [milter] listen: "inet:mx.example:11332": the host must be an IP address',
        '<config>:3: [milter] socket_mode: "rw-rw----" is not an octal file mode such as "0660"',
        '<config>:4: [milter] socket_group: no group "no-such-group-here" on this machine',
        "<config>:5: [milter] command_timeout: must be greater than 0",
    ]


def test_no_front_end_at_all_is_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        loads("[server]\nlisten = []\n")
    assert exc.value.problems == ["<config>:2: no listener: set [server] listen or [milter] listen"]
    with pytest.raises(ConfigError) as exc:
        loads('[milter]\nlisten = ["inet:127.0.0.1:1", "inet:127.0.0.1:1"]\n')
    assert "is listed twice" in exc.value.problems[0]
