"""Redis with an ACL user and a password from a file, and Redis over TLS.

Real redis-servers on loopback: one whose default user is off and whose only
user is spamgate's, and one that speaks only TLS, with a certificate from the
tests' throw-away CA (trustme).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from spamgate.cli import main
from tests.kit.ports import free_port
from tests.kit.redisserver import ClusterSet, RedisServer, Sentinel
from tests.kit.sink import Sink

from ..conftest import REDIS_CLI, REDIS_SENTINEL, REDIS_SERVER, GateFactory, issue, need_binary
from .stateful import codes, send

LIMIT = '[ratelimit]\nmessages_per_ip = "2/1m"\n'
DOCS = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def documented_acl() -> list[str]:
    """The ACL rules docs/scaling.md gives spamgate's user, so that they are tested."""
    line = next(ln for ln in DOCS.read_text().splitlines() if ln.startswith("ACL SETUSER"))
    words = line.split()
    assert words[:4] == ["ACL", "SETUSER", "spamgate", "on"] and words[4].startswith(">")
    return words[5:]


def acl_user(password: str = "s3cret") -> list[str]:
    return ["--user", "spamgate", "on", f">{password}", *documented_acl()]


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    """Only the user "spamgate" (password "s3cret", the documented rights) may log in."""
    need_binary(REDIS_SERVER, "redis-server")
    server = RedisServer(args=["--user", "default", "off", *acl_user()])
    server.start()
    yield server
    server.stop()


def password_file(directory: Path, password: str, mode: int = 0o640) -> Path:
    path = directory / "redis.pass"
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


def state(server: RedisServer, url: str | None = None, **extra: str) -> str:
    lines = ["[state]", f'redis = "{url or server.url}"', *(f"{k} = {v}" for k, v in extra.items())]
    return "\n".join(lines) + "\n"


async def test_acl_user_with_a_password_file(
    gate_factory: GateFactory, sink: Sink, acl_redis: RedisServer, tmp_path
) -> None:
    secret = password_file(tmp_path, "s3cret")
    config = state(acl_redis, username='"spamgate"', password_file=f'"{secret}"')
    a, b = await gate_factory(config + LIMIT), await gate_factory(config + LIMIT)
    assert [codes(await send(g))[-1] for g in (a, b, a)] == [250, 250, 450]
    raw = acl_redis.client(username="spamgate", password="s3cret")
    assert raw.hgetall("spamgate:rl:{127.0.0.0/24}:messages_per_ip:60000:127.0.0.5")
    raw.close()
    assert "s3cret" not in repr(a.server.services.state.target.client)


async def test_acl_user_on_a_cluster(gate_factory: GateFactory, sink: Sink, tmp_path) -> None:
    """The documented rights suffice for a Cluster too (slot map, COMMAND)."""
    need_binary(REDIS_SERVER, "redis-server")
    need_binary(REDIS_CLI, "redis-cli (redis-tools)")
    secret = password_file(tmp_path, "s3cret")
    cluster = ClusterSet(args=acl_user()).start()
    try:
        state = "\n".join(["[state]", *cluster.state_lines(), 'username = "spamgate"'])
        gate = await gate_factory(state + f'\npassword_file = "{secret}"\n' + LIMIT)
        assert gate.server.services.state.available
        assert [codes(await send(gate))[-1] for _ in range(3)] == [250, 250, 450]
    finally:
        cluster.stop()


@pytest.fixture
def guarded_sentinel(tmp_path) -> Iterator[Sentinel]:
    """A Sentinel with a password of its own (requirepass), watching an ACL'd primary."""
    need_binary(REDIS_SERVER, "redis-server")
    need_binary(REDIS_SENTINEL, "redis-sentinel")
    primary = RedisServer(args=acl_user())
    primary.start()
    sentinel = Sentinel(tmp_path, "mail", primary.port, quorum=1, extra="requirepass watchful\n")
    sentinel.start()
    yield sentinel
    sentinel.stop()
    primary.stop()


def sentinel_state(sentinel: Sentinel, tmp_path, sentinel_password: str) -> str:
    secret = password_file(tmp_path, "s3cret")
    (tmp_path / "sentinel.pass").write_text(sentinel_password + "\n")
    return (
        f'[state]\nsentinels = ["{sentinel.address}"]\nservice_name = "mail"\n'
        f'username = "spamgate"\npassword_file = "{secret}"\n'
        'sentinel_password_file = "sentinel.pass"\n'
    )


async def test_sentinels_with_a_password(
    gate_factory: GateFactory, sink: Sink, guarded_sentinel: Sentinel, tmp_path
) -> None:
    gate = await gate_factory(sentinel_state(guarded_sentinel, tmp_path, "watchful") + LIMIT)
    assert gate.server.services.state.available
    assert [codes(await send(gate))[-1] for _ in range(3)] == [250, 250, 450]


async def test_a_wrong_sentinel_password(
    gate_factory: GateFactory,
    sink: Sink,
    guarded_sentinel: Sentinel,
    tmp_path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = await gate_factory(sentinel_state(guarded_sentinel, tmp_path, "guess") + LIMIT)
    assert not gate.server.services.state.available
    assert "the sentinels name no usable primary" in caplog.text
    assert f"sentinel {guarded_sentinel.address} - " in caplog.text
    assert "guess" not in caplog.text
    assert [codes(await send(gate))[-1] for _ in range(3)] == [250, 250, 250]  # open


def check(tmp_path, text: str) -> tuple[int, str]:
    config = tmp_path / "spamgate.toml"
    config.write_text(text)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["check", "-c", str(config)])
    return code, out.getvalue()


def test_check_warns_about_a_password_in_the_config(tmp_path) -> None:
    code, out = check(tmp_path, '[state]\nredis = "redis://:hunter2@127.0.0.1:6379/0"\n')
    assert code == 0
    assert f"{tmp_path}/spamgate.toml:2: warning: [state] redis holds a password" in out
    assert "put it in password_file" in out and out.rstrip().endswith(": ok")

    code, out = check(tmp_path, '[state]\nredis = "redis://127.0.0.1:6379/0"\n')
    assert code == 0 and "warning: [state]" not in out

    secret = password_file(tmp_path, "s3cret", mode=0o644)
    code, out = check(tmp_path, f'[state]\nredis = "redis://h:1/0"\npassword_file = "{secret}"\n')
    assert code == 0 and f"warning: [state] password_file: {secret} is readable by anyone" in out


def test_check_refuses_bad_credential_settings(tmp_path, monkeypatch) -> None:
    code, out = check(tmp_path, '[state]\nredis = "redis://h:1/0"\npassword_file = "nope"\n')
    assert code == 1
    assert f"spamgate.toml:3: [state] password_file: {tmp_path}/nope: no such file" in out
    # from the configuration's directory, named as the admin would open it
    monkeypatch.chdir(tmp_path)
    code, out = check(tmp_path, '[state]\nredis = "rediss://h:1/0"\ntls_ca_file = "ca.pem"\n')
    assert code == 1 and "spamgate.toml:3: [state] tls_ca_file: ca.pem: no such file" in out

    secret = password_file(tmp_path, "s3cret")
    text = f'[state]\nredis = "redis://:x@h:1/0"\npassword_file = "{secret}"\n'
    code, out = check(tmp_path, text)
    assert code == 1 and "the redis URL and password_file both give a password" in out

    (tmp_path / "two.pass").write_text("one\ntwo\n")
    code, out = check(tmp_path, '[state]\nredis = "redis://h:1/0"\npassword_file = "two.pass"\n')
    assert code == 1 and "give the password on one line" in out

    for text, problem in [
        ('redis = "redis://h:1/0"\ncluster = ["h:2"]', "give one of redis, sentinels and cluster"),
        ('sentinels = ["h:26379"]', "sentinels need a service_name"),
        ('redis = "redis://h:1/0"\ntls = true', 'write "rediss://" for TLS'),
        ('cluster = ["h:1"]\ntls_cert_file = "c.pem"', "tls_cert_file and tls_key_file go"),
        ('cluster = ["h"]', '"h" is not "host:port"'),
    ]:
        code, out = check(tmp_path, f"[state]\n{text}\n")
        assert code == 1 and problem in out, (text, out)
        assert out.startswith(f"{tmp_path}/spamgate.toml:"), out


# -- TLS ------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(ca: trustme.CA, tmp_path) -> Iterator[tuple[RedisServer, int, Path]]:
    """A redis-server whose TLS port wants a client certificate from the same CA.

    Its plain port is only for the start-up check; the tests use the TLS port.
    """
    need_binary(REDIS_SERVER, "redis-server")
    files = issue(ca, tmp_path, "redis.test")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    tls_port = free_port()
    server = RedisServer(
        args=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", files.cert,
            "--tls-key-file", files.key,
            "--tls-ca-cert-file", str(ca_file),
            "--tls-auth-clients", "optional",
        ]
    )  # fmt: skip
    server.start()
    yield server, tls_port, ca_file
    server.stop()


async def test_rediss_verified_against_a_ca(
    gate_factory: GateFactory, sink: Sink, tls_redis, ca: trustme.CA, tmp_path
) -> None:
    server, port, ca_file = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    client_cert = issue(ca, tmp_path, "spamgate.test", tag="-client")
    config = state(server, url, tls_ca_file=f'"{ca_file}"') + LIMIT
    with_cert = state(
        server,
        url,
        tls_ca_file=f'"{ca_file}"',
        tls_cert_file=f'"{client_cert.cert}"',
        tls_key_file=f'"{client_cert.key}"',
    )
    a, b = await gate_factory(config), await gate_factory(with_cert + LIMIT)
    assert a.server.services.state.available and b.server.services.state.available
    assert [codes(await send(g))[-1] for g in (a, b, a)] == [250, 250, 450]
    assert "TLS" in a.server.services.state.describe()


async def test_rediss_with_a_certificate_we_cannot_verify(
    gate_factory: GateFactory, sink: Sink, tls_redis, caplog: pytest.LogCaptureFixture
) -> None:
    server, port, _ = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    # no tls_ca_file: the system's CAs, which never signed the tests' CA
    config = state(server, url, on_unavailable='"tempfail"') + LIMIT
    gate = await gate_factory(config)
    assert not gate.server.services.state.available
    assert "its TLS certificate does not verify ([state] tls_ca_file)" in caplog.text
    replies = await send(gate)
    assert codes(replies)[-1] == 451 and not sink.messages


def test_tls_files_must_be_readable(tmp_path) -> None:
    code, out = check(
        tmp_path, '[state]\nredis = "rediss://h:1/0"\ntls_ca_file = "missing-ca.pem"\n'
    )
    assert code == 1 and f"[state] tls_ca_file: {tmp_path}/missing-ca.pem: no such file" in out


def test_scaling_examples_are_valid_configurations() -> None:
    """Every [state] example in docs/scaling.md loads as it stands."""
    from spamgate.app import loads

    blocks = [b.split("```", 1)[0] for b in DOCS.read_text().split("```toml\n")[1:]]
    assert len(blocks) == 4
    kinds = set()
    for block in blocks:
        state = loads(block, "scaling.md").state
        assert state.shared
        kinds.add("sentinels" if state.sentinels else "cluster" if state.cluster else "redis")
    assert kinds == {"redis", "sentinels", "cluster"}
