"""The core's configuration sections and the loader for the whole file.

Keys and defaults are documented on the fields themselves; `spamgate config-reference`
prints them and a test keeps the README's reference in step with them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .domains import domain_key
from .settings import (
    ConfigError,
    Located,
    build_section,
    hostport_or_empty,
    hostports,
    networks,
    non_negative,
    parse_hostport,
    positive,
    setting,
)


def _upstream_address(value: str) -> str | None:
    if value.startswith("maildir:"):
        return None if value[len("maildir:") :] else "maildir: needs a directory"
    return hostports([value])


SASL_MECHANISMS = ("PLAIN", "LOGIN")


def _mechanisms(value: list[str]) -> str | None:
    # spamgate must read the login name from the exchange to pass it on with
    # XCLIENT LOGIN when it re-introduces the client; it can for these two.
    for item in value:
        if item.upper() not in SASL_MECHANISMS:
            return f'"{item}" is not one of {", ".join(SASL_MECHANISMS)}'
    return None


def _address_ports(value: list[str]) -> str | None:
    for item in value:
        try:
            host, _port = parse_hostport(item)
            ipaddress.ip_address(host)
        except ValueError:
            return f'"{item}" is not "address:port" (an IP address, not a name)'
    return None


def _fraction(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be between 0 and 1"


def _domains(value: list[str]) -> str | None:
    for item in value:
        if (
            not item
            or " " in item
            or "@" in item
            or domain_key(item.lstrip("."), lenient=True) is None
        ):
            return f'"{item}" is not a domain'
    return None


@dataclass(frozen=True)
class ServerSettings:
    listen: list[str] = setting(
        ["127.0.0.1:2525"],
        'Addresses to listen on, "host:port" ("[::1]:25" for IPv6).',
        check=hostports,
    )
    hostname: str = setting("", "Name in the greeting, EHLO reply and headers; default: FQDN.")
    greeting: str = setting("ESMTP", "Text after the hostname in the 220 greeting.")
    relay_domains: list[str] = setting(
        [],
        'Domains we accept mail for; ".example.com" also matches subdomains.',
        check=_domains,
    )
    mynetworks: list[str] = setting(
        ["127.0.0.0/8", "::1/128"],
        "Client networks allowed to relay to any domain.",
        check=networks,
    )
    mode: Literal["enforce", "monitor"] = setting(
        "enforce", 'Set "monitor" to log and count what checks would refuse, refusing nothing.'
    )
    workers: int = setting(
        1,
        "Worker processes, each with its own socket per listener (SO_REUSEPORT) and "
        "a share of max_sessions; one process uses one core. 0: one per core spamgate "
        "may run on, less one for Postfix (at least 1).",
        check=non_negative,
    )
    uvloop: bool = setting(
        True,
        "Run on uvloop when it is installed (less CPU per message); false: asyncio's "
        "own event loop.",
    )
    shutdown_grace: float = setting(
        30.0, "Seconds sessions may take to finish after SIGTERM.", check=non_negative
    )
    proxy_protocol: bool = setting(
        False,
        "Expect a PROXY v1/v2 header on every connection (behind HAProxy); "
        "default for every listener.",
    )
    proxy_protocol_timeout: float = setting(
        5.0, "Seconds to wait for the PROXY header (then the connection is closed).", check=positive
    )
    require_tls: bool = setting(
        False,
        "Refuse MAIL and AUTH until the client used STARTTLS (530 5.7.0); "
        "default for every listener.",
    )
    auth_passthrough: bool = setting(
        False,
        "Offer AUTH after STARTTLS and relay it to the upstream, which owns the "
        "SASL database; default for every listener.",
    )
    user: str = setting(
        "",
        "Started as root: run as this user (and its groups) once the listeners are "
        "bound; empty: keep running as root.",
    )
    quarantine: str = setting(
        "spamgate-quarantine", "Maildir where HOLD (quarantined) messages are written."
    )
    spool_dir: str = setting(
        "",
        "Directory for messages larger than [limits] spool_size while they are in "
        "flight (removed once relayed); empty: the system's temporary directory.",
    )
    reload_interval: float = setting(
        2.0,
        "Seconds between looks at the config and rule files; a change reloads them "
        "(0: only on SIGHUP).",
        check=non_negative,
    )


@dataclass(frozen=True)
class ListenerSettings:
    """One `[[listener]]` table: an address with its own options.

    Unset options take the `[server]` value; `[server] listen` addresses are
    listeners with every option from `[server]`.
    """

    address: str = setting(
        "", 'Address to listen on, "host:port" (required).', check=hostport_or_empty
    )
    proxy_protocol: bool | None = setting(
        None, "Expect a PROXY header here; unset: [server] proxy_protocol."
    )
    require_tls: bool | None = setting(
        None, "Refuse MAIL and AUTH before STARTTLS here; unset: [server] require_tls."
    )
    auth_passthrough: bool | None = setting(
        None, "Offer AUTH passthrough here; unset: [server] auth_passthrough."
    )


@dataclass(frozen=True)
class Listener:
    """A listener with every option resolved (what the server binds and serves)."""

    address: str
    proxy_protocol: bool = False
    require_tls: bool = False
    auth_passthrough: bool = False


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str = setting(
        "", "PEM certificate chain offered with STARTTLS; empty (with key_file): no STARTTLS."
    )
    key_file: str = setting("", "PEM private key of cert_file (readable by the service user).")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = setting(
        "TLSv1.2", "Oldest TLS version accepted from clients."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file and self.key_file)


@dataclass(frozen=True)
class AuthSettings:
    mechanisms: list[str] = setting(
        ["PLAIN", "LOGIN"],
        "SASL mechanisms offered and relayed (PLAIN, LOGIN); the upstream must offer them too.",
        check=_mechanisms,
    )
    skip_checks: list[str] = setting(
        [], 'Checks not run for authenticated clients (check names, or "all").'
    )


@dataclass(frozen=True)
class UpstreamSettings:
    address: str = setting(
        "maildir:spamgate-maildir",
        'Where clean mail goes: "host:port" of the MTA, or "maildir:PATH" to try spamgate alone.',
        check=_upstream_address,
    )
    xclient: bool = setting(True, "Send XCLIENT so the MTA sees the real client (Postfix).")
    helo_name: str = setting("", "Our EHLO name towards the upstream; default: server hostname.")
    connect_timeout: float = setting(
        30.0, "Seconds to connect and get the greeting.", check=positive
    )
    command_timeout: float = setting(
        100.0,
        "Seconds to wait for any upstream reply (Postfix smtpd_proxy_timeout).",
        check=positive,
    )
    data_timeout: float = setting(
        600.0,
        "Seconds to wait for the reply to the final dot (RFC 5321: 10 min).",
        check=positive,
    )
    pool_size: int = setting(
        0,
        "Idle upstream connections kept for the next client sessions (XCLIENT again; "
        "Postfix needs smtpd_authorized_xclient_hosts = static:all, docs/performance.md); "
        "0 disables.",
        check=non_negative,
    )
    pool_idle_timeout: float = setting(
        5.0,
        "Seconds an idle pooled connection is kept (below Postfix's smtpd_timeout, "
        "10 s under stress).",
        check=positive,
    )
    tls: Literal["off", "opportunistic", "required"] = setting(
        "off",
        'STARTTLS towards the upstream: "off", "opportunistic" (if offered, '
        'unverified) or "required" (451 without it).',
    )
    tls_verify: bool = setting(
        True, 'With tls = "required": check the upstream certificate and name.'
    )
    tls_ca_file: str = setting(
        "", "PEM CA bundle to verify the upstream with; empty: the system's CAs."
    )
    tls_server_name: str = setting(
        "", "Name expected in the upstream certificate; default: the host of address."
    )


@dataclass(frozen=True)
class LimitSettings:
    message_size: int = setting(
        10240000, "Largest message in bytes (SIZE and actual size; 552 5.3.4).", check=positive
    )
    spool_size: int = setting(
        1048576,
        "Messages larger than this are held on disk ([server] spool_dir), not in memory.",
        check=positive,
    )
    header_size: int = setting(
        1048576, "Largest header block of a message in bytes (552 5.3.4).", check=positive
    )
    recipients: int = setting(1000, "Recipients per message (452 4.5.3).", check=positive)
    command_line_length: int = setting(
        2048, "Longest command line in bytes, CRLF included (500 5.5.2).", check=positive
    )
    text_line_length: int = setting(
        1000, "Longest message line in bytes, CRLF included (500 5.5.2).", check=positive
    )
    idle_timeout: float = setting(
        300.0, "Seconds to wait for a complete command line (421 4.4.2).", check=positive
    )
    data_timeout: float = setting(
        180.0, "Seconds to wait for more message data during DATA (421 4.4.2).", check=positive
    )
    errors: int = setting(
        20, "Errors a client may make without delivering mail (then 421).", check=positive
    )
    max_sessions: int = setting(
        5000,
        "Concurrent sessions in all (421 4.7.0 at connect); with several workers, "
        "each takes its share.",
        check=positive,
    )
    sessions_per_client: int = setting(
        50,
        "Concurrent sessions per client IP (421 4.7.0 at connect); counted by each "
        "worker for itself.",
        check=positive,
    )
    min_data_rate: float = setting(
        500.0,
        "Bytes/s a client must average in DATA: the message may take data_timeout plus "
        "1 s per this many bytes (Postfix smtpd_min_data_rate); 0: no minimum.",
        check=non_negative,
    )
    stress_threshold: float = setting(
        0.8,
        "Share of max_sessions in use at which spamgate is under stress and uses the "
        "stress_ timeouts (Postfix ${stress}); 0: never.",
        check=_fraction,
    )
    stress_idle_timeout: float = setting(
        10.0,
        "idle_timeout under stress (Postfix: smtpd_timeout = ${stress?{10}:{300}}).",
        check=positive,
    )
    stress_data_timeout: float = setting(10.0, "data_timeout under stress.", check=positive)


@dataclass(frozen=True)
class SmtpSettings:
    bare_newline: Literal["reject", "normalize"] = setting(
        "reject", 'Bare LF/CR in DATA: "reject" (550 5.5.2) or "normalize" to CRLF.'
    )
    forbid_unauth_pipelining: bool = setting(
        True, "Close sessions that send ahead after EHLO, HELO or DATA (554 5.5.0)."
    )
    pregreet_wait: float = setting(
        0.0,
        "Seconds to wait before the greeting to catch clients that talk first.",
        check=non_negative,
    )
    pregreet_action: Literal["ignore", "enforce", "drop"] = setting(
        "ignore", 'Client that talks first: "ignore" (log), "enforce" (reject at RCPT), "drop".'
    )
    delay_reject: bool = setting(
        True, "Give connect, HELO and MAIL rejections at the first RCPT (smtpd_delay_reject)."
    )
    smtputf8: bool = setting(True, "Offer SMTPUTF8.")


@dataclass(frozen=True)
class DnsSettings:
    nameservers: list[str] = setting(
        [],
        'Resolvers as "address:port"; empty: the system\'s (/etc/resolv.conf).',
        check=_address_ports,
    )
    timeout: float = setting(2.0, "Seconds per query attempt.", check=positive)
    lifetime: float = setting(
        5.0, "Seconds in all for one lookup, retries included.", check=positive
    )
    cache_size: int = setting(
        50000, "Answers kept in the cache (TTL-honouring LRU).", check=positive
    )
    reverse_lookup: bool = setting(
        True, "Look up the client's verified reverse name (sent upstream as XCLIENT NAME)."
    )
    breaker_failures: int = setting(
        5,
        "Queries in a row that a nameserver leaves unanswered before it counts as down "
        "(logged, counted): lookups then skip it, and fail at once (temperror) while "
        "every nameserver is down; 0: never.",
        check=non_negative,
    )
    probe_interval: float = setting(
        1.0,
        "Seconds between the probes of a nameserver that is down; its first answer brings it back.",
        check=positive,
    )


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = setting(
        "",
        'Prometheus endpoint "host:port" (/metrics, /healthz, /readyz); empty: off.',
        check=hostport_or_empty,
    )
    probe_interval: float = setting(
        10.0,
        "Seconds a /readyz check of the upstream is reused, so probes cannot flood the MTA.",
        check=positive,
    )


def _redis_url(value: str) -> str | None:
    if not value:
        return None
    from redis.asyncio.connection import parse_url

    try:
        parse_url(value)
    except ValueError as exc:
        return f'"{value}" is not a Redis URL ({exc})'
    return None


@dataclass(frozen=True)
class StateSettings:
    redis: str = setting(
        "",
        'One Redis shared by all instances, "redis://host:port/db" ("rediss://" for TLS); '
        "empty (and no sentinels or cluster): in-process, not shared.",
        check=_redis_url,
    )
    sentinels: list[str] = setting(
        [],
        'Redis Sentinels as "host:port": the primary of service_name is found through them '
        "and followed after a failover.",
        check=hostports,
    )
    service_name: str = setting("", "The Sentinels' name for the primary (sentinel monitor).")
    cluster: list[str] = setting(
        [],
        'Some nodes of a Redis Cluster as "host:port"; the others are found from them.',
        check=hostports,
    )
    username: str = setting("", "ACL user spamgate logs in as; empty: the default user.")
    password_file: str = setting(
        "", "File holding the password of username (one line; keep it out of this file)."
    )
    sentinel_password_file: str = setting(
        "", "File holding the password of the Sentinels themselves (their requirepass), if any."
    )
    tls: bool = setting(
        False, "TLS to the Sentinels and the primary, or to the Cluster nodes (see redis for one)."
    )
    tls_ca_file: str = setting(
        "", "PEM CA bundle to verify the Redis servers with; empty: the system's CAs."
    )
    tls_cert_file: str = setting(
        "", "PEM client certificate, for servers with tls-auth-clients yes; empty: none."
    )
    tls_key_file: str = setting("", "PEM private key of tls_cert_file.")
    key_prefix: str = setting(
        "spamgate:",
        'Prefix of every Redis key spamgate writes (a hash tag, "{spamgate}:", keeps them '
        "on one Cluster node).",
    )
    timeout: float = setting(
        0.5,
        "Seconds one state operation may take in all (connecting, retries and a failover "
        "included) before on_unavailable applies.",
        check=positive,
    )
    retry_interval: float = setting(
        2.0, "Seconds between reconnection attempts while Redis is unreachable.", check=positive
    )
    on_unavailable: Literal["open", "tempfail"] = setting(
        "open",
        'While Redis is unreachable: "open" skips the stateful checks, "tempfail" says 451 4.3.0.',
    )
    memory_max_keys: int = setting(
        200000,
        "Entries the in-process store keeps at most; the least recently used go first.",
        check=positive,
    )

    def __post_init__(self) -> None:
        # Reported by the loader as "[state]: ..." at the section's line.
        given = [k for k in ("redis", "sentinels", "cluster") if getattr(self, k)]
        if len(given) > 1:
            raise ValueError(f"give one of redis, sentinels and cluster, not {' and '.join(given)}")
        if self.sentinels and not self.service_name:
            raise ValueError("sentinels need a service_name (the name in 'sentinel monitor')")
        if self.service_name and not self.sentinels:
            raise ValueError("service_name is for sentinels; give them too")
        if self.tls and self.redis.startswith("redis://"):
            raise ValueError('tls = true with a "redis://" URL: write "rediss://" for TLS')
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")

    @property
    def shared(self) -> bool:
        """True when the state lives in Redis (one server, Sentinel or Cluster)."""
        return bool(self.redis or self.sentinels or self.cluster)

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.redis.startswith("rediss://")


@dataclass(frozen=True)
class ScoringSettings:
    reject: float = setting(15.0, "Total score at or above which mail is refused (550 5.7.1).")
    tempfail: float = setting(0.0, "Score at or above which mail is deferred (451); 0: off.")
    tag: float = setting(5.0, "Score at or above which X-Spam-* headers are added.")
    symbols: dict[str, float] = setting(
        {}, "Score per symbol name, overriding the score a rule or check suggests."
    )


# Sections written as arrays of tables (`[[listener]]`), one table per item.
ARRAY_SECTIONS = frozenset({"listener"})

CORE_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "listener": ListenerSettings,
    "tls": TlsSettings,
    "auth": AuthSettings,
    "upstream": UpstreamSettings,
    "limits": LimitSettings,
    "smtp": SmtpSettings,
    "dns": DnsSettings,
    "metrics": MetricsSettings,
    "scoring": ScoringSettings,
    "state": StateSettings,
}


@dataclass(frozen=True)
class Config:
    """The whole file, parsed. `sections` holds check-owned sections by name."""

    path: str | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    listeners: tuple[Listener, ...] = (Listener("127.0.0.1:2525"),)
    tls: TlsSettings = field(default_factory=TlsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    state: StateSettings = field(default_factory=StateSettings)
    sections: dict[str, Any] = field(default_factory=dict)
    hostname: str = "localhost"
    base_dir: str = "."

    def section(self, name: str) -> Any:
        return self.sections[name]

    def where(self) -> Located:
        """The file's text, for `file:line:` errors found after loading (rule files, TLS)."""
        text = ""
        if self.path:
            try:
                with open(self.path, encoding="utf-8") as fh:
                    text = fh.read()
            except (OSError, UnicodeDecodeError):
                pass
        return Located(self.path or "<config>", text)

    def resolve_path(self, path: str) -> str:
        """Paths in the file are relative to the file's directory."""
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.base_dir, path))

    @property
    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.server.mynetworks]

    @property
    def upstream_endpoint(self) -> tuple[str, int] | None:
        if self.upstream.address.startswith("maildir:"):
            return None
        return parse_hostport(self.upstream.address)


def cores_for_workers() -> int:
    """`workers = 0`: a worker per core this process may run on (its CPU affinity,
    as taskset or a cpuset allow), less one for the Postfix behind it."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def loads(text: str, path: str = "<config>", sections: Mapping[str, type] | None = None) -> Config:
    """Parse config text; raise ConfigError listing every problem found.

    `sections` are the sections beside the core's (the checks', by name: the
    composition root hands them in); a section not known is an error.
    """
    where = Located(path, text)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        line = 1
        if "(at line " in msg:
            line = int(msg.split("(at line ", 1)[1].split(",", 1)[0])
            msg = msg.split(" (at line ", 1)[0]
        raise ConfigError([f"{path}:{line}: {msg}"]) from None
    problems: list[str] = []
    known = {**CORE_SECTIONS, **(sections or {})}
    built: dict[str, Any] = {}
    listener_tables = _listener_tables(raw.pop("listener", []), where, problems)
    for name, table in raw.items():
        if name not in known:
            problems.append(where.at(name, None, f"unknown section [{name}]"))
            continue
        if not isinstance(table, dict):
            problems.append(where.at("", name, f"'{name}' must be a [section]"))
            continue
        built[name] = build_section(known[name], table, name, where, problems)
    for name, cls in known.items():
        built.setdefault(name, cls())
    server: ServerSettings = built["server"]
    if server.workers == 0:
        server = dataclasses.replace(server, workers=cores_for_workers())
    # With [[listener]] tables, the default `listen` would add a surprise listener.
    explicit_listen = "listen" in raw.get("server", {})
    listeners = _resolve_listeners(
        server, server.listen if explicit_listen or not listener_tables else [], listener_tables
    )
    positions = [-1] * (len(listeners) - len(listener_tables)) + [n for n, _ in listener_tables]
    problems += _listener_problems(listeners, positions, built["tls"], built["upstream"], where)
    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()
    config = Config(
        path=path if path != "<config>" else None,
        server=server,
        listeners=tuple(listeners),
        tls=built["tls"],
        auth=built["auth"],
        upstream=built["upstream"],
        limits=built["limits"],
        smtp=built["smtp"],
        dns=built["dns"],
        metrics=built["metrics"],
        scoring=built["scoring"],
        state=built["state"],
        sections={k: v for k, v in built.items() if k not in CORE_SECTIONS},
        hostname=server.hostname or socket.getfqdn(),
        base_dir=base_dir,
    )
    if problems:
        raise InvalidConfig(problems, config)
    return config


class InvalidConfig(ConfigError):
    """Problems in the file's settings, with `partial`: the configuration as it is
    with each bad setting left at its default. `spamgate check` goes on with it to
    the rule tables and the certificate, to report every problem at once."""

    def __init__(self, problems: list[str], partial: Config) -> None:
        super().__init__(problems)
        self.partial = partial


class _NthTable(Located):
    """Line numbers inside the n-th `[[name]]` table of an array of tables."""

    def __init__(self, where: Located, nth: int) -> None:
        super().__init__(where.path, where.text)
        self.nth = nth

    def line_of(self, section: str, key: str | None = None, item: str | None = None) -> int:
        seen = -1
        inside = False
        header_line = 1
        for lineno, raw in enumerate(self.text.splitlines(), 1):
            line = raw.strip()
            if line.startswith("["):
                inside = line.replace(" ", "") == f"[[{section}]]"
                if inside:
                    seen += 1
                    if seen == self.nth:
                        header_line = lineno
                continue
            if not inside or seen != self.nth or key is None:
                continue
            if line.split("=", 1)[0].strip().strip('"') == key:
                return lineno
        return header_line


def _listener_tables(
    value: Any, where: Located, problems: list[str]
) -> list[tuple[int, ListenerSettings]]:
    """The valid `[[listener]]` tables, each with its position in the file."""
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        problems.append(where.at("listener", None, "listeners are [[listener]] tables"))
        return []
    tables = []
    for nth, table in enumerate(value):
        located = _NthTable(where, nth)
        built = build_section(ListenerSettings, table, "listener", located, problems)
        if not built.address:
            if "address" not in table:
                problems.append(located.at("listener", None, "[[listener]] needs an address"))
            continue
        tables.append((nth, built))
    return tables


def _resolve_listeners(
    server: ServerSettings, listen: list[str], tables: list[tuple[int, ListenerSettings]]
) -> list[Listener]:
    def pick(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    out = [
        Listener(addr, server.proxy_protocol, server.require_tls, server.auth_passthrough)
        for addr in listen
    ]
    for _, t in tables:
        out.append(
            Listener(
                t.address,
                pick(t.proxy_protocol, server.proxy_protocol),
                pick(t.require_tls, server.require_tls),
                pick(t.auth_passthrough, server.auth_passthrough),
            )
        )
    return out


def _listener_problems(
    listeners: list[Listener],
    positions: list[int],
    tls: TlsSettings,
    upstream: UpstreamSettings,
    where: Located,
) -> list[str]:
    """Combinations that would refuse every client, or cannot work at all."""
    problems: list[str] = []
    if not listeners:
        problems.append(where.at("server", "listen", "no listener: set [server] listen"))
    seen: set[tuple[str, int]] = set()
    for index, lst in enumerate(listeners):
        key = parse_hostport(lst.address)
        if key in seen and key[1] != 0:  # port 0: any free port, each time
            text = f'"{lst.address}" is listed twice'
            nth = positions[index]  # -1: from [server] listen
            problems.append(
                where.at("server", "listen", text)
                if nth < 0
                else _NthTable(where, nth).at("listener", "address", text)
            )
        seen.add(key)
        if lst.require_tls and not tls.enabled:
            problems.append(
                where.at(
                    "tls", None, f"{lst.address}: require_tls needs [tls] cert_file and key_file"
                )
            )
        if lst.auth_passthrough and not tls.enabled:
            problems.append(
                where.at(
                    "tls",
                    None,
                    f"{lst.address}: auth_passthrough needs [tls] cert_file and key_file "
                    "(AUTH is only offered after STARTTLS)",
                )
            )
        if lst.auth_passthrough and upstream.address.startswith("maildir:"):
            problems.append(
                where.at(
                    "upstream",
                    "address",
                    f"{lst.address}: auth_passthrough needs an SMTP upstream that checks passwords",
                )
            )
    if bool(tls.cert_file) != bool(tls.key_file):
        problems.append(where.at("tls", None, "[tls] needs both cert_file and key_file"))
    return problems


def hostname_problem(config: Config) -> str | None:
    """Why the host name does not do for an MX, or None. Clients see it in the
    greeting and EHLO reply, and a `${myhostname}` HELO rule (the shipped "You are
    not me") refuses every client that says it: with "localhost", clients that say
    "localhost"."""
    name = config.hostname.rstrip(".").lower()
    if "." in name and name != "localhost.localdomain" and not name.endswith(".localhost"):
        return None
    which = (
        f'[server] hostname "{config.hostname}"'
        if config.server.hostname
        else f'[server] hostname is unset and this machine\'s name, "{config.hostname}",'
    )
    return (
        f"{which} is not a fully qualified domain name: set [server] hostname to this "
        "MX's public name (spamgate greets clients with it, and a ${myhostname} HELO rule "
        'such as "You are not me" refuses clients that say it)'
    )


def load(path: str | None, sections: Mapping[str, type] | None = None) -> Config:
    """Load the file at `path` (`sections`: as for `loads`); None gives the
    embedded defaults."""
    if path is None:
        return loads("", sections=sections)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}:1: not UTF-8 text"]) from None
    return loads(text, path, sections)
