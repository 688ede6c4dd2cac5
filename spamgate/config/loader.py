"""The loader for the whole file: the core's sections, the checks' (handed in), the
listeners, and every problem reported at once as `file:line: message`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .sections import (
    CORE_SECTIONS,
    AuthSettings,
    DnsSettings,
    LimitSettings,
    Listener,
    ListenerSettings,
    MetricsSettings,
    MilterSettings,
    ScoringSettings,
    ServerSettings,
    SmtpSettings,
    StateSettings,
    TlsSettings,
    UpstreamSettings,
)
from .settings import ConfigError, Located, build_section, parse_hostport, unreadable


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
    milter: MilterSettings = field(default_factory=MilterSettings)
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
    milter: MilterSettings = built["milter"]
    # With [[listener]] tables or a milter, the default `listen` would add a
    # surprise listener: the proxy listens where it is told to, or not at all.
    explicit_listen = "listen" in raw.get("server", {})
    default_listen = not listener_tables and not milter.enabled
    listeners = _resolve_listeners(
        server, server.listen if explicit_listen or default_listen else [], listener_tables
    )
    positions = [-1] * (len(listeners) - len(listener_tables)) + [n for n, _ in listener_tables]
    problems += _listener_problems(
        listeners, positions, built["tls"], built["upstream"], where, milter.enabled
    )
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
        milter=milter,
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
    milter: bool = False,
) -> list[str]:
    """Combinations that would refuse every client, or cannot work at all."""
    problems: list[str] = []
    if not listeners and not milter:
        problems.append(
            where.at("server", "listen", "no listener: set [server] listen or [milter] listen")
        )
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
    except OSError as exc:
        raise ConfigError([f"{path}: {unreadable(exc)}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}:1: not UTF-8 text"]) from None
    return loads(text, path, sections)
