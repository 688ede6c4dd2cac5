"""Process-wide state: the current policy snapshot, shared services, session counts.

A `Policy` is an immutable snapshot of one configuration: its checks, built and
validated. A reload builds a new one and swaps the reference; sessions keep the
snapshot they started with, so they finish on the rules they began with.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import ssl
import time
from dataclasses import dataclass

from . import metrics
from .checks import CHECK_TYPES
from .checks.base import Check
from .config import Config, StateSettings
from .model import IPAddress
from .pipeline import Pipeline
from .relay import RelayPolicy
from .services import Services
from .settings import ConfigError
from .tls import server_context

log = logging.getLogger("spamgate")


@dataclass(frozen=True)
class Policy:
    config: Config
    pipeline: Pipeline
    relay: RelayPolicy
    digest: str
    # The STARTTLS certificate, loaded with this snapshot (a reload renews it).
    tls: ssl.SSLContext | None = None
    # Check labels authenticated (AUTH passthrough) clients skip; "all" skips every one.
    auth_skip: frozenset[str] = frozenset()

    @classmethod
    def build(cls, config: Config, services: Services) -> Policy:
        """Build every check; raises settings.ConfigError listing every bad rule file line."""
        checks: list[Check] = []
        problems: list[str] = []
        for kind in CHECK_TYPES:
            try:
                checks.extend(kind.from_config(config, services))
            except ConfigError as exc:
                problems += [p for p in exc.problems if p not in problems]
        known = {kind.name for kind in CHECK_TYPES} | {c.label for c in checks} | {"all"}
        unknown = [name for name in config.auth.skip_checks if name not in known]
        if unknown:
            names = ", ".join(f'"{n}"' for n in unknown)
            problems.append(
                config.where().at("auth", "skip_checks", f"[auth] skip_checks: unknown {names}")
            )
        tls = None
        try:
            tls = server_context(config)
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError(problems)
        return cls(
            config=config,
            pipeline=Pipeline(checks, monitor=config.server.mode == "monitor"),
            relay=RelayPolicy(config.server.relay_domains, config.server.mynetworks),
            digest=config_digest(config),
            tls=tls,
            auth_skip=frozenset(config.auth.skip_checks),
        )


def build(config: Config) -> tuple[Services, Policy]:
    """The shared services and the first policy of `config`; ConfigError listing
    every problem of both at once (the upstream's CA file, each rule table, the
    certificate), so that one `spamgate check` shows all there is to fix."""
    problems: list[str] = []
    try:
        services = Services.build(config)
    except ConfigError as exc:
        problems += exc.problems
        # Go on without upstream TLS and the shared store, whose files were the
        # problem, to find the rest.
        upstream = dataclasses.replace(config.upstream, tls="off")
        bare = dataclasses.replace(config, upstream=upstream, state=StateSettings())
        services = Services.build(bare)
    try:
        policy = Policy.build(config, services)
    except ConfigError as exc:
        problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise ConfigError(problems)
    return services, policy


def sources(config: Config) -> list[str]:
    """The config file and every file its checks read: what the reload watcher watches."""
    files = [config.path] if config.path else []
    for kind in CHECK_TYPES:
        files += [f for f in kind.sources(config) if f not in files]
    # A renewed certificate is a new configuration, picked up like a rule file.
    for name in (config.tls.cert_file, config.tls.key_file):
        if name and config.resolve_path(name) not in files:
            files.append(config.resolve_path(name))
    return files


def config_digest(config: Config) -> str:
    """A hash of the config file and every rule file: changes when any of them does."""
    h = hashlib.sha256()
    for path in sources(config):
        h.update(path.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(path, "rb") as fh:
                h.update(fh.read())
        except OSError:
            pass
    return h.hexdigest()[:16]


class Runtime:
    """What all sessions of this process share."""

    def __init__(self, policy: Policy, services: Services, share: int = 1) -> None:
        self.policy = policy
        self.services = services
        # Workers sharing the limits: this process takes 1/share of max_sessions.
        self.share = share
        self.active = 0
        self.per_client: collections.Counter[IPAddress] = collections.Counter()
        self.closing = False
        self.loaded_at = time.time()
        # Open SMTP sessions (smtp.protocol.SMTPSession), for shutdown.
        self.sessions: set = set()
        # Problems that made the last reload fail (empty when it succeeded): health.
        self.reload_problems: list[str] = []
        # Near max_sessions: shorter timeouts, like Postfix's ${stress} (see `stressed`).
        self.stressed = False
        # New clients are refused from this descriptor number on (fdlimit.watermark).
        self.fd_watermark: int | None = None
        self._note_policy(policy)

    @property
    def config(self) -> Config:
        return self.policy.config

    def _note_policy(self, policy: Policy) -> None:
        checks = policy.pipeline.checks
        metrics.declare_checks(
            (c.label, [s.value for s in c.stages], c.metric_series()) for c in checks
        )
        metrics.note_config(policy.digest, self.loaded_at)

    def swap(self, policy: Policy) -> None:
        self.policy = policy
        self.loaded_at = time.time()
        self._note_policy(policy)

    def admit(self, address: IPAddress, fd: int = -1) -> str | None:
        """Count a new session; the refusal reason if a limit is reached.

        `fd` is the client socket's descriptor: accept() returns the lowest free
        one, so at least `fd` others are open, and above `fd_watermark` the
        sessions already admitted would have none left for their upstream.
        """
        limits = self.policy.config.limits
        if self.closing:
            return "shutdown"
        if self.active >= -(-limits.max_sessions // self.share):
            return "max_sessions"
        if self.fd_watermark is not None and fd >= self.fd_watermark:
            return "fd_limit"
        if self.per_client[address] >= limits.sessions_per_client:
            return "per_client"
        self.active += 1
        self.per_client[address] += 1
        metrics.SESSIONS_ACTIVE.inc()
        self._check_stress()
        return None

    def release(self, address: IPAddress) -> None:
        self.active -= 1
        metrics.SESSIONS_ACTIVE.dec()
        self.per_client[address] -= 1
        if self.per_client[address] <= 0:
            del self.per_client[address]
        self._check_stress()

    def _check_stress(self) -> None:
        """Enter or leave stress as the session count crosses the threshold.

        Under stress every session waits `stress_idle_timeout` / `stress_data_timeout`
        instead of the usual minutes, so that clients holding sessions open without
        using them (slowloris) cannot crowd out the ones that send mail. Sessions
        already waiting are told at once, not at their next command.
        """
        limits = self.policy.config.limits
        threshold = limits.stress_threshold * limits.max_sessions
        stressed = limits.stress_threshold > 0 and self.active >= threshold
        if stressed == self.stressed:
            return
        self.stressed = stressed
        metrics.STRESS.set(int(stressed))
        if stressed:
            log.warning(
                "under stress: %d sessions (max_sessions %d); timeouts now %gs idle, %gs data",
                self.active,
                limits.max_sessions,
                limits.stress_idle_timeout,
                limits.stress_data_timeout,
            )
            for session in list(self.sessions):
                session.stress()
        else:
            log.info("no longer under stress: %d sessions", self.active)
