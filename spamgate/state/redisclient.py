"""How spamgate reaches Redis: one server, the primary Sentinel names, or a Cluster.

The failover logic is redis-py's own: `redis.asyncio.Sentinel` asks the Sentinels
for the primary whenever it opens a connection, and drops connections to a
primary that was demoted (READONLY); `RedisCluster` reads the slot map from the
nodes and follows MOVED and ASK redirections. What is added here is what an
admin needs around them: the password read from a file (never from the main
configuration, which is often world-readable and kept in version control),
TLS verified against a CA, a log line and a metric when Sentinel names another
primary, and the address in use for every log line.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ClusterDownError

from .. import metrics
from ..config.settings import ConfigError, display_path, parse_hostport, unreadable

if TYPE_CHECKING:
    from ..config import Config, StateSettings

log = logging.getLogger("spamgate.state")

Address = tuple[str, int]


@dataclass(frozen=True)
class Credentials:
    """What the password files held (kept out of repr, so out of any log line)."""

    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def read_credentials(config: Config) -> Credentials:
    """Read `[state] password_file` and `sentinel_password_file`; ConfigError if unreadable."""
    s = config.state
    where = config.where()
    problems: list[str] = []

    def read(key: str) -> str | None:
        name = getattr(s, key)
        if not name:
            return None
        path = display_path(config.resolve_path(name))
        try:
            with open(config.resolve_path(name), encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            problems.append(where.at("state", key, f"[state] {key}: {path}: {unreadable(exc)}"))
            return None
        except UnicodeDecodeError:
            problems.append(where.at("state", key, f"[state] {key}: {path}: not UTF-8 text"))
            return None
        lines = text.splitlines()
        if not lines or not lines[0] or len([ln for ln in lines if ln.strip()]) > 1:
            problems.append(
                where.at("state", key, f"[state] {key}: {path}: give the password on one line")
            )
            return None
        return lines[0]

    creds = Credentials(read("password_file"), read("sentinel_password_file"))
    if s.redis:
        try:
            in_url = parse_url(s.redis)
        except ValueError:
            in_url = {}
        # redis-py lets the URL win; say so rather than log in as someone else.
        if in_url.get("password") and s.password_file:
            text = "the redis URL and password_file both give a password: keep password_file"
            problems.append(where.at("state", "redis", f"[state] {text}"))
        if in_url.get("username") and s.username:
            text = "the redis URL and username both give a user name: keep one"
            problems.append(where.at("state", "redis", f"[state] {text}"))
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        name = getattr(s, key)
        if not name:
            continue
        try:
            with open(config.resolve_path(name), "rb"):
                pass
        except OSError as exc:
            why = f"{display_path(config.resolve_path(name))}: {unreadable(exc)}"
            problems.append(where.at("state", key, f"[state] {key}: {why}"))
    if problems:
        raise ConfigError(problems)
    return creds


def config_warnings(config: Config) -> list[str]:
    """What `spamgate check` (and the start of `spamgate run`) should point out in [state]."""
    s = config.state
    where = config.where()
    out: list[str] = []
    if s.redis:
        try:
            parsed = parse_url(s.redis)
        except ValueError:
            parsed = {}
        if parsed.get("password"):
            out.append(
                where.at(
                    "state",
                    "redis",
                    "warning: [state] redis holds a password; configuration files get read, "
                    "copied and committed: put it in password_file (mode 0640) instead",
                )
            )
    for key in ("password_file", "sentinel_password_file"):
        name = getattr(s, key)
        if not name:
            continue
        try:
            mode = os.stat(config.resolve_path(name)).st_mode
        except OSError:
            continue
        if mode & stat.S_IROTH:
            out.append(
                where.at("state", key, f"warning: [state] {key}: {name} is readable by anyone")
            )
    return out


def _tls_options(s: StateSettings) -> dict[str, Any]:
    """redis-py's TLS options: the chain and the name are verified, always."""
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if s.tls_ca_file:
        options["ssl_ca_certs"] = s.tls_ca_file
    if s.tls_cert_file:
        options["ssl_certfile"] = s.tls_cert_file
        options["ssl_keyfile"] = s.tls_key_file
    return options


def _resolved(config: Config) -> StateSettings:
    """[state] with its file names made absolute (they are relative to the config file)."""
    s = config.state
    files = ("tls_ca_file", "tls_cert_file", "tls_key_file")
    return dataclasses.replace(
        s, **{k: config.resolve_path(getattr(s, k)) for k in files if getattr(s, k)}
    )


class Target(abc.ABC):
    """A redis-py client and what the log should say about where it points."""

    client: Any  # redis.asyncio.Redis or RedisCluster
    clustered = False

    @abc.abstractmethod
    def where(self) -> str:
        """The server in use now, for log lines ("127.0.0.1:6379/0")."""

    def describe(self) -> str:
        return self.where()

    async def probe(self) -> None:
        """Raise unless Redis answers (and, with Sentinel, a primary is known)."""
        await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()


class SingleTarget(Target):
    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self.url = url
        self.client = aioredis.Redis.from_url(url, **options)

    def where(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        if "path" in kw:
            return f"unix:{kw['path']}"
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"

    def describe(self) -> str:
        tls = ", TLS" if self.url.startswith("rediss://") else ""
        return f"{self.where()}{tls}"


class _FollowedPool(SentinelConnectionPool):
    """redis-py's Sentinel pool, telling us what the Sentinels answered."""

    def __init__(
        self, service_name: str, sentinel_manager: Sentinel, *, on_primary: Callable, **kw: Any
    ) -> None:
        self._on_primary = on_primary
        super().__init__(service_name, sentinel_manager, **kw)

    async def get_master_address(self) -> Any:
        address = await super().get_master_address()
        self._on_primary((str(address[0]), int(address[1])))
        return address


class SentinelTarget(Target):
    def __init__(
        self,
        sentinels: list[Address],
        service_name: str,
        options: dict[str, Any],
        sentinel_options: dict[str, Any],
    ) -> None:
        self.sentinels = sentinels
        self.service_name = service_name
        self.tls = bool(options.get("ssl"))
        self.primary: Address | None = None
        self.manager = Sentinel(sentinels, sentinel_kwargs=sentinel_options, **options)
        pool = functools.partial(_FollowedPool, on_primary=self._primary_named)
        self.client = self.manager.master_for(service_name, connection_pool_class=pool)

    def _primary_named(self, address: Address) -> None:
        before, self.primary = self.primary, address
        if before == address:
            return
        if before is None:
            log.info(
                "state store: the sentinels name %s:%d as the primary of %r",
                *address,
                self.service_name,
            )
            return
        metrics.STATE_PRIMARY_CHANGES.inc()
        log.warning(
            "state store: the primary of %r is now %s:%d (was %s:%d); following it",
            self.service_name,
            *address,
            *before,
        )

    def where(self) -> str:
        primary = f"{self.primary[0]}:{self.primary[1]}" if self.primary else "not known yet"
        return f"sentinel service {self.service_name!r} (primary {primary})"

    def describe(self) -> str:
        via = ", ".join(f"{h}:{p}" for h, p in self.sentinels)
        tls = ", TLS" if self.tls else ""
        return f"sentinel service {self.service_name!r} via {via}{tls}"

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.manager.aclose()


class ClusterTarget(Target):
    clustered = True

    def __init__(self, nodes: list[Address], options: dict[str, Any]) -> None:
        self.nodes = nodes
        self.tls = bool(options.get("ssl"))
        self.client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in nodes], **options
        )

    def where(self) -> str:
        return "cluster via " + ", ".join(f"{h}:{p}" for h, p in self.nodes)

    def describe(self) -> str:
        return self.where() + (", TLS" if self.tls else "")

    async def probe(self) -> None:
        # Every primary, and each must see the cluster whole: a node that is back
        # but not yet readmitted would refuse its slots (CLUSTERDOWN).
        infos = await self.client.cluster_info(target_nodes=RedisCluster.PRIMARIES)
        if "cluster_state" in infos:  # one primary: redis-py gives its answer alone
            infos = {"the primary": infos}
        bad = sorted(name for name, info in infos.items() if info.get("cluster_state") != "ok")
        if bad:
            raise ClusterDownError(f"cluster_state is not ok on {', '.join(bad)}")


def _options(timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One quick retry on a fresh connection covers a pooled connection that a
        # restarted server closed (through Sentinel: one to a demoted primary; in a
        # Cluster: after a refresh of the slot map); longer outages are the store's
        # probe's business, so that the log names the error, not our timeout.
        "retry": Retry(NoBackoff(), 1),
    }


def single_target(url: str, timeout: float) -> SingleTarget:
    """One server at `url`, no credentials but the URL's."""
    return SingleTarget(url, _options(timeout))


def connect(s: StateSettings, credentials: Credentials, timeout: float) -> Target:
    """A client for [state] (no connection is opened until the first command)."""
    options = _options(timeout)
    if s.username:
        options["username"] = s.username
    if credentials.password is not None:
        options["password"] = credentials.password
    if s.redis:
        if s.redis.startswith("rediss://"):
            options.update(_tls_options(s))
        return SingleTarget(s.redis, options)
    if s.tls:
        options.update(ssl=True, **_tls_options(s))
    if s.sentinels:
        # Sentinels have their own password (and no retries: redis-py moves on to
        # the next Sentinel instead).
        sentinel_options = {
            k: v for k, v in options.items() if k not in ("username", "password", "retry")
        }
        if credentials.sentinel_password is not None:
            sentinel_options["password"] = credentials.sentinel_password
        return SentinelTarget(
            [parse_hostport(a) for a in s.sentinels], s.service_name, options, sentinel_options
        )
    return ClusterTarget([parse_hostport(a) for a in s.cluster], options)


def open_target(config: Config) -> Target:
    """The client [state] asks for, credentials read (ConfigError if a file is bad)."""
    credentials = read_credentials(config)
    return connect(_resolved(config), credentials, config.state.timeout)
