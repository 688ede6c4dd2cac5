"""The core's configuration sections, each a frozen dataclass of documented settings.

Keys and defaults are documented on the fields themselves (`settings.setting`);
`spamgate config-reference` prints them and a test keeps the README's reference
in step with them. The checks' own sections live with each check (`Check.section`).
"""

from __future__ import annotations

import grp
import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from ..domains import domain_key
from .settings import (
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
class MilterAddress:
    """One milter listener: TCP (`host`, `port`) or a unix socket (`path`)."""

    text: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def unix(self) -> bool:
        return bool(self.path)


def parse_milter_address(text: str) -> MilterAddress:
    """A milter listener as Postfix names one in smtpd_milters: "inet:host:port"
    (an IP address, "[v6]" for IPv6) or "unix:/absolute/path". ValueError with a
    readable text."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix":
        if not rest.startswith("/"):
            raise ValueError(f'"{text}": the socket path must be absolute ("unix:/run/...")')
        return MilterAddress(text, path=rest)
    if sep and kind == "inet":
        host, port = parse_hostport(rest)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f'"{text}": the host must be an IP address') from None
        return MilterAddress(text, host=host, port=port)
    raise ValueError(f'"{text}" is not "inet:host:port" or "unix:/path"')


def _milter_addresses(value: list[str]) -> str | None:
    seen: set[str] = set()
    for item in value:
        try:
            parse_milter_address(item)
        except ValueError as exc:
            return str(exc)
        if item in seen and not item.endswith(":0"):
            return f'"{item}" is listed twice'
        seen.add(item)
    return None


def _group(value: str) -> str | None:
    if not value:
        return None
    try:
        grp.getgrnam(value)
    except KeyError:
        return f'no group "{value}" on this machine'
    return None


def _mode(value: str) -> str | None:
    if re.fullmatch(r"0?[0-7]{3}", value):
        return None
    return f'"{value}" is not an octal file mode such as "0660"'


@dataclass(frozen=True)
class MilterSettings:
    """The milter front end: Postfix keeps port 25 and asks spamgate (docs/milter.md)."""

    listen: list[str] = setting(
        [],
        'Milter sockets: "inet:127.0.0.1:11332" or "unix:/run/spamgate/milter.sock" '
        "(Postfix: smtpd_milters); empty: no milter.",
        check=_milter_addresses,
    )
    socket_mode: str = setting(
        "0660", "File mode of unix sockets (Postfix's smtpd must be able to connect).", check=_mode
    )
    socket_group: str = setting(
        "",
        'Group of unix sockets, e.g. "postfix" (spamgate must be a member, or started as '
        "root); empty: spamgate's own group.",
        check=_group,
    )
    command_timeout: float = setting(
        30.0,
        "Postfix's milter_command_timeout (connect to DATA): spamgate answers within it, "
        "tempfail if its checks are still running.",
        check=positive,
    )
    content_timeout: float = setting(
        300.0,
        "Postfix's milter_content_timeout (header to end of message): spamgate answers "
        "within it, tempfail if its checks are still running.",
        check=positive,
    )

    @property
    def enabled(self) -> bool:
        return bool(self.listen)


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
    "milter": MilterSettings,
    "scoring": ScoringSettings,
    "state": StateSettings,
}
