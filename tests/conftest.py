"""Shared fixtures: a recording upstream sink, a DNS server, a private Postfix, spamgate.

Every spamgate started here resolves through `dns_server`, a per-test authoritative
server on loopback: nothing reaches the system resolver, and a test publishes the
records it needs (`dns_server.zone(...)`) before it connects.
"""

from __future__ import annotations

import os
import pathlib
import ssl
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import trustme

from spamgate import metrics
from spamgate.app import DEFAULT_CHECKS, build, loads
from spamgate.ops.server import Server
from spamgate.pipeline.check import Check
from tests.kit.daemons import CLAMD, RSPAMD, SPAMD, Clamd, Rspamd, Spamd
from tests.kit.dnsserver import DnsServer
from tests.kit.postfix import POSTFIX, PostfixInstance
from tests.kit.redisserver import (
    REDIS_CLI,
    REDIS_SENTINEL,
    REDIS_SERVER,
    ClusterSet,
    RedisServer,
    SentinelSet,
)
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient, Reply

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# SPAMGATE_TEST_LOOP=uvloop runs every test on uvloop, spamgate's default loop in
# production (.ci/run runs the suite on both); unset: asyncio's own loop.
TEST_LOOP = os.environ.get("SPAMGATE_TEST_LOOP", "asyncio")
if TEST_LOOP == "uvloop":
    import uvloop

    def pytest_asyncio_loop_factories(config, item):  # pytest-asyncio >= 1.4 hook
        return {"uvloop": uvloop.new_event_loop}

elif TEST_LOOP != "asyncio":
    raise RuntimeError(f"SPAMGATE_TEST_LOOP={TEST_LOOP!r}: use asyncio or uvloop")


ROOT = pathlib.Path(__file__).resolve().parents[1]


def spamgate_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m spamgate ARGS` from the repository's root, its output as text."""
    return subprocess.run(
        [sys.executable, "-m", "spamgate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def need_binary(path: str, what: str) -> None:
    """Skip locally when a system binary is missing; fail in CI, which installs it."""
    if os.path.exists(path):
        return
    if IN_CI:
        pytest.fail(f"{what} ({path}) is missing in CI: .ci/run must install it")
    pytest.skip(f"{what} not installed ({path})")


def sample(name: str, **labels: str) -> float:
    """A metric's value in this process's registry (the in-process spamgates the
    tests start count there); 0 for a series not created yet."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A throw-away certificate authority; every test certificate comes from it."""
    return trustme.CA()


@dataclass
class TlsFiles:
    cert: str
    key: str
    ca: trustme.CA

    def client_context(self) -> ssl.SSLContext:
        """What a careful client uses: verifies the chain and the name."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.ca.configure_trust(ctx)
        return ctx

    @property
    def toml(self) -> str:
        return f'[tls]\ncert_file = "{self.cert}"\nkey_file = "{self.key}"\n'


def issue(ca: trustme.CA, directory, name: str = "gate.test", tag: str = "") -> TlsFiles:
    """A certificate for `name` and its key, written as PEM files in `directory`."""
    leaf = ca.issue_cert(name, "127.0.0.1")
    cert, key = directory / f"{name}{tag}.crt", directory / f"{name}{tag}.key"
    with open(cert, "wb") as fh:
        for blob in leaf.cert_chain_pems:
            fh.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key))
    return TlsFiles(str(cert), str(key), ca)


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path) -> TlsFiles:
    return issue(ca, tmp_path)


def need_postfix() -> None:
    """A private Postfix needs the binary and root (it drops to its own users)."""
    need_binary(POSTFIX, "Postfix")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("the Postfix integration tests must run as root in CI")
        pytest.skip("a private Postfix instance needs root")


@pytest.fixture(scope="session")
def postfix() -> Iterator[PostfixInstance]:
    """One private Postfix for the whole run (tests/kit/postfix.py describes it).

    Shared because starting one takes about a second; tests tell their mail apart
    by a unique marker in the message and a client address of their own.
    """
    need_postfix()
    with PostfixInstance() as instance:
        yield instance


PostfixFactory = Callable[..., PostfixInstance]


@pytest.fixture(scope="module")
def postfix_factory() -> Iterator[PostfixFactory]:
    """Start Postfix instances with other settings (PostfixInstance's arguments:
    `main_extra` lines, `smtpd_options`, a whole `listener`); stopped after the module.
    """
    need_postfix()
    started: list[PostfixInstance] = []

    def start(**kwargs: object) -> PostfixInstance:
        instance = PostfixInstance(**kwargs)  # type: ignore[arg-type]
        started.append(instance)
        return instance.start()

    yield start
    for instance in started:
        instance.cleanup()


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    s = Sink()
    await s.start()
    yield s
    await s.stop()


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    """A DNS server with no zones yet: every name is NXDOMAIN until published."""
    s = DnsServer()
    await s.start()
    yield s
    await s.stop()


class Gate:
    """A running spamgate and ways to talk to it."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.host, self.port = server.addresses[0] if server.addresses else ("", 0)

    async def client(
        self, source: str | None = None, listener: int = 0, greet: bool = True
    ) -> tuple[RawClient, object]:
        host, port = self.server.addresses[listener]
        return await RawClient.connect(port, host, source=source, greet=greet)

    async def send(
        self,
        body: bytes,
        *,
        sender: str = "a@example.org",
        rcpts: Sequence[str] = ("u@example.test",),
        source: str | None = "127.0.0.2",
        helo: str = "client.example.test",
    ) -> list[Reply]:
        """One session, one transaction, from `source` (by default a client outside
        the test mynetworks); every reply after the greeting, the final dot's last."""
        c, _ = await self.client(source=source)
        try:
            return await c.mail(sender, list(rcpts), body, helo=helo)
        finally:
            await c.close()

    async def stop(self) -> None:
        await self.server.stop(grace=0.5)


GateFactory = Callable[..., Awaitable[Gate]]


def config_text(
    sink: Sink | None,
    extra: str = "",
    server: dict | None = None,
    up: dict | None = None,
    dns: DnsServer | None = None,
    resolver: dict | None = None,
) -> str:
    """A test config; `server`/`up`/`resolver` ([dns]) map keys to TOML literals,
    `extra` adds sections."""
    srv = {
        "listen": '["127.0.0.1:0"]',
        "hostname": '"gate.test"',
        "relay_domains": '["example.test"]',
        "mynetworks": '["127.0.0.1/32"]',
    }
    srv.update(server or {})
    ups = {"address": f'"{sink.address}"' if sink else '"maildir:maildir"'}
    ups.update(up or {})
    text = "[server]\n" + "".join(f"{k} = {v}\n" for k, v in srv.items())
    text += "\n[upstream]\n" + "".join(f"{k} = {v}\n" for k, v in ups.items())
    # Short DNS timeouts: a test that waits on DNS by mistake fails fast, not in 5 s.
    res = {"timeout": "0.5", "lifetime": "1.0"}
    if dns is not None:
        res["nameservers"] = f'["{dns.address}"]'
    else:  # no DNS in this config: no checks, no reverse lookups
        res["reverse_lookup"] = "false"
    res.update(resolver or {})
    text += "\n[dns]\n" + "".join(f"{k} = {v}\n" for k, v in res.items())
    return text + "\n" + textwrap.dedent(extra)


@pytest.fixture
async def gate_factory(sink: Sink, dns_server: DnsServer, tmp_path) -> AsyncIterator[GateFactory]:
    """Start spamgate with extra TOML appended to a default test config."""
    gates: list[Gate] = []

    async def start(
        extra: str = "",
        *,
        upstream: Sink | str | None = "sink",
        server: dict | None = None,
        up: dict | None = None,
        resolver: dict | None = None,
        checks: Sequence[type[Check]] = DEFAULT_CHECKS,
    ) -> Gate:
        """`checks`: the check types spamgate runs (a test's own, or the registry's)."""
        target = sink if upstream == "sink" else upstream
        sink_or_none = target if isinstance(target, Sink) else None
        text = config_text(sink_or_none, extra, server, up, dns_server, resolver)
        path = tmp_path / f"spamgate-{len(gates)}.toml"
        path.write_text(text)
        srv = Server(build(loads(text, str(path), checks), checks=checks))
        await srv.start()
        g = Gate(srv)
        gates.append(g)
        return g

    yield start
    for g in gates:
        await g.stop()


@pytest.fixture
async def gate(gate_factory: GateFactory) -> Gate:
    return await gate_factory()


# -- state stores ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private redis-server for the session; tests keep apart by key prefix."""
    need_binary(REDIS_SERVER, "redis-server")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test may stop and start."""
    need_binary(REDIS_SERVER, "redis-server")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterSet]:
    """One Redis Cluster of three primaries for the session; tests keep apart by key prefix."""
    need_binary(REDIS_SERVER, "redis-server")
    need_binary(REDIS_CLI, "redis-cli (redis-tools)")
    cluster = ClusterSet().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def sentinel_set() -> Iterator[SentinelSet]:
    """A primary, a replica and three Sentinels for the session; not to be failed over."""
    need_binary(REDIS_SERVER, "redis-server")
    need_binary(REDIS_SENTINEL, "redis-sentinel")
    sentinels = SentinelSet().start()
    yield sentinels
    sentinels.stop()


@pytest.fixture
def fresh_sentinel_set() -> Iterator[SentinelSet]:
    """A Sentinel-watched primary and replica of the test's own, to fail over."""
    need_binary(REDIS_SERVER, "redis-server")
    need_binary(REDIS_SENTINEL, "redis-sentinel")
    sentinels = SentinelSet().start()
    yield sentinels
    sentinels.stop()


def state_section(redis: RedisServer | SentinelSet | ClusterSet | None, **extra: object) -> str:
    """A [state] section: Redis (with a prefix of the test's own) or the default."""
    lines = ["[state]"]
    if redis is not None:
        lines += [*redis.state_lines(), f'key_prefix = "t-{uuid.uuid4().hex[:12]}:"']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(params=["memory", "redis", "cluster"])
def state_toml(request: pytest.FixtureRequest) -> str:
    """Run the test with the in-process store, one Redis and a three-node Redis Cluster."""
    if request.param == "memory":
        return state_section(None)
    if request.param == "cluster":
        return state_section(request.getfixturevalue("redis_cluster"))
    return state_section(request.getfixturevalue("redis_server"))


# -- content scanners (clamd, spamd, rspamd) -------------------------------------------


@pytest.fixture(scope="session")
def clamd() -> Iterator[Clamd]:
    """One private clamd for the session, with only the tests' signature (daemons.py)."""
    need_binary(CLAMD, "clamd (clamav-daemon)")
    server = Clamd().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def spamd() -> Iterator[Spamd]:
    """One private spamd for the session: Debian's shipped rules, local tests only."""
    need_binary(SPAMD, "spamd (SpamAssassin)")
    server = Spamd().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def rspamd() -> Iterator[Rspamd]:
    """One private rspamd for the session, with a minimal configuration of its own."""
    need_binary(RSPAMD, "rspamd")
    server = Rspamd().start()
    yield server
    server.cleanup()
