"""The core's configuration sections and the loader for the whole file.

Keys and defaults are documented on the fields themselves; `spamgate config-reference`
prints them and a test keeps the README's reference in step with them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

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


def _address_ports(value: list[str]) -> str | None:
    for item in value:
        try:
            host, _port = parse_hostport(item)
            ipaddress.ip_address(host)
        except ValueError:
            return f'"{item}" is not "address:port" (an IP address, not a name)'
    return None


def _domains(value: list[str]) -> str | None:
    for item in value:
        if not item or " " in item or "@" in item:
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
    workers: int = setting(1, "Worker processes sharing the listeners.", check=positive)
    shutdown_grace: float = setting(
        30.0, "Seconds sessions may take to finish after SIGTERM.", check=non_negative
    )
    proxy_protocol: bool = setting(
        False, "Expect a PROXY v1/v2 header on every connection (behind HAProxy)."
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
        "Idle upstream connections kept for reuse (XCLIENT again); 0 disables.",
        check=non_negative,
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
        5000, "Concurrent sessions in all (421 4.7.0 at connect).", check=positive
    )
    sessions_per_client: int = setting(
        50, "Concurrent sessions per client IP (421 4.7.0 at connect).", check=positive
    )


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


@dataclass(frozen=True)
class MetricsSettings:
    listen: str = setting(
        "",
        'Prometheus endpoint "host:port" (/metrics, /healthz, /readyz); empty: off.',
        check=hostport_or_empty,
    )


@dataclass(frozen=True)
class ScoringSettings:
    reject: float = setting(15.0, "Total score at or above which mail is refused (550 5.7.1).")
    tempfail: float = setting(0.0, "Score at or above which mail is deferred (451); 0: off.")
    tag: float = setting(5.0, "Score at or above which X-Spam-* headers are added.")
    symbols: dict[str, float] = setting(
        {}, "Score per symbol name, overriding the score a rule or check suggests."
    )


CORE_SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "upstream": UpstreamSettings,
    "limits": LimitSettings,
    "smtp": SmtpSettings,
    "dns": DnsSettings,
    "metrics": MetricsSettings,
    "scoring": ScoringSettings,
}


@dataclass(frozen=True)
class Config:
    """The whole file, parsed. `sections` holds check-owned sections by name."""

    path: str | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    sections: dict[str, Any] = field(default_factory=dict)
    hostname: str = "localhost"
    base_dir: str = "."

    def section(self, name: str) -> Any:
        return self.sections[name]

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


def all_sections() -> dict[str, type]:
    from .checks import CHECK_SECTIONS

    return {**CORE_SECTIONS, **CHECK_SECTIONS}


def loads(text: str, path: str = "<config>") -> Config:
    """Parse config text; raise ConfigError listing every problem found."""
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
    known = all_sections()
    built: dict[str, Any] = {}
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
    if problems:
        raise ConfigError(problems)
    server: ServerSettings = built["server"]
    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()
    return Config(
        path=path if path != "<config>" else None,
        server=server,
        upstream=built["upstream"],
        limits=built["limits"],
        smtp=built["smtp"],
        dns=built["dns"],
        metrics=built["metrics"],
        scoring=built["scoring"],
        sections={k: v for k, v in built.items() if k not in CORE_SECTIONS},
        hostname=server.hostname or socket.getfqdn(),
        base_dir=base_dir,
    )


def load(path: str | None) -> Config:
    """Load the file at `path`; None gives the embedded defaults."""
    if path is None:
        return loads("")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}:1: not UTF-8 text"]) from None
    return loads(text, path)
