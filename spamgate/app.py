"""The composition root: the one place spamgate is put together.

`build(config, checks=...)` makes an `App`: the services the checks use (DNS, the
state store, worker threads and processes), the upstream and the quarantine, the
first policy (the configuration's checks, built and validated), and the runtime
that all sessions of the process share. `spamgate run` (one process, or each
worker), `spamgate check`, `spamgate explain` and the tests all ask it, each with
the checks it wants (the registry's by default) and, where it must, its own parts
in place of the configured ones: a dry upstream and a throwaway store (explain),
recorded DNS answers (a replay). With [capture] on, it wraps the resolver and the
state store so that what they answer is recorded, and gives every session driver
a recorder (`capture`): any front end's sessions are recorded alike.

It is also where the configuration loader learns the checks' sections (`load`,
`loads`), so that the loader needs to know nothing of the checks.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence

from . import metrics
from .background import Background
from .capture import Capture, CaptureSettings, RecordingResolver, RecordingStore
from .checks.registry import CHECK_TYPES
from .config import CORE_SECTIONS, Config, StateSettings
from .config import load as load_file
from .config import loads as load_text
from .config.settings import ConfigError
from .flow.disposal import Disposal, Quarantine
from .flow.driver import SessionDriver
from .model import IPAddress, Session
from .pipeline.check import Check
from .pipeline.observer import Observer, Observers
from .pipeline.policy import Policy
from .pipeline.runner import CorePolicy, Pipeline
from .resolver import DnsResolver, Resolver
from .services import Services
from .state import StateStore, build_store
from .tls import server_context, upstream_context
from .upstream.base import Upstream
from .upstream.dry import DryUpstream
from .upstream.maildir import MaildirUpstream
from .upstream.smtp import SmtpUpstream

log = logging.getLogger("spamgate")

# The checks spamgate runs unless told otherwise: the registry's, in its order.
DEFAULT_CHECKS: tuple[type[Check], ...] = tuple(CHECK_TYPES)

Checks = Sequence[type[Check]]

# Sections of neither the core's configuration nor a check's.
EXTRA_SECTIONS: dict[str, type] = {"capture": CaptureSettings}


# -- the configuration ---------------------------------------------------------------


def sections(checks: Checks = DEFAULT_CHECKS) -> dict[str, type]:
    """Every section a configuration may have: the core's, [capture], then the
    checks' own."""
    out = {**CORE_SECTIONS, **EXTRA_SECTIONS}
    for kind in checks:
        if kind.section is not None:
            name, settings = kind.section
            out.setdefault(name, settings)
    return out


def check_sections(checks: Checks) -> dict[str, type]:
    core = set(CORE_SECTIONS)
    return {k: v for k, v in sections(checks).items() if k not in core}


def loads(text: str, path: str = "<config>", checks: Checks = DEFAULT_CHECKS) -> Config:
    """Parse configuration text with the sections of `checks`; ConfigError listing
    every problem found."""
    return load_text(text, path, check_sections(checks))


def load(path: str | None, checks: Checks = DEFAULT_CHECKS) -> Config:
    """Load the configuration file at `path` (None: the embedded defaults)."""
    return load_file(path, check_sections(checks))


def sources(config: Config, checks: Checks = DEFAULT_CHECKS) -> list[str]:
    """The config file and every file its checks read: what the reload watcher watches."""
    files = [config.path] if config.path else []
    for kind in checks:
        files += [f for f in kind.sources(config) if f not in files]
    # A renewed certificate is a new configuration, picked up like a rule file.
    for name in (config.tls.cert_file, config.tls.key_file):
        if name and config.resolve_path(name) not in files:
            files.append(config.resolve_path(name))
    return files


def digest(config: Config, checks: Checks = DEFAULT_CHECKS) -> str:
    """A hash of the config file and every rule file: changes when any of them does."""
    h = hashlib.sha256()
    for path in sources(config, checks):
        h.update(path.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(path, "rb") as fh:
                h.update(fh.read())
        except OSError:
            pass
    return h.hexdigest()[:16]


def build_policy(
    config: Config, services: Services, checks: Checks = DEFAULT_CHECKS, *, counted: bool = True
) -> Policy:
    """Build every check of `checks` for `config`; ConfigError listing every bad
    rule file line, the certificate's problems and unknown [auth] skip_checks.
    `counted` False: its decisions count in no metric (`Pipeline`)."""
    built: list[Check] = []
    problems: list[str] = []
    for kind in checks:
        try:
            built.extend(kind.from_config(config, services))
        except ConfigError as exc:
            problems += [p for p in exc.problems if p not in problems]
    known = {kind.name for kind in checks} | {c.label for c in built} | {"all"}
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
    pipeline = Pipeline(
        built,
        CorePolicy.from_config(config),
        monitor=config.server.mode == "monitor",
        skip=frozenset(config.auth.skip_checks),
        counted=counted,
    )
    return Policy(config=config, pipeline=pipeline, digest=digest(config, checks), tls=tls)


def build_upstream(config: Config) -> Upstream:
    """Where accepted mail goes: the MTA of [upstream] address, or a Maildir."""
    if config.upstream.address.startswith("maildir:"):
        path = config.resolve_path(config.upstream.address[len("maildir:") :])
        return MaildirUpstream(path, config.hostname)
    return SmtpUpstream(config.upstream, config.hostname, upstream_context(config))


# -- the application -------------------------------------------------------------------


class App:
    """One process's spamgate: its parts, its policy, its sessions."""

    def __init__(
        self,
        config: Config,
        checks: Checks,
        services: Services,
        upstream: Upstream,
        disposal: Disposal,
        policy: Policy,
        *,
        share: int = 1,
        observer: Observer | None = None,
        capture: Capture | None = None,
        counted: bool = True,
    ) -> None:
        self.config = config
        self.checks = tuple(checks)
        self.services = services
        self.upstream = upstream
        self.disposal = disposal
        self.background = Background()
        self.observer = observer  # every session's, besides its own
        self.capture = capture  # [capture]: a recorder for every session
        self.counted = counted  # False: sessions count in no metric (a replay)
        self.runtime = Runtime(policy, share=share)

    @property
    def policy(self) -> Policy:
        return self.runtime.policy

    def load(self, path: str | None) -> Config:
        """The configuration file at `path`, with this application's checks' sections."""
        return load(path, self.checks)

    def build_policy(self, config: Config) -> Policy:
        """A new policy for `config` on the running services (a reload)."""
        return build_policy(config, self.services, self.checks, counted=self.counted)

    def sources(self, config: Config) -> list[str]:
        return sources(config, self.checks)

    def driver(
        self,
        session: Session,
        *,
        observer: Observer | None = None,
        lookup_name: bool = True,
        upstream: Upstream | None = None,
        disposal: Disposal | None = None,
    ) -> SessionDriver:
        """The session driver for a new client session, on the current policy.

        The client's verified name is looked up at connect when [dns]
        reverse_lookup says so; a front end that knows it already (a milter: the
        MTA's own lookup) sets it on the client and passes `lookup_name=False`.
        `upstream` and `disposal` replace the application's for this session (a
        milter's: Postfix already has the mail, and holds it itself).
        """
        policy = self.runtime.policy
        lookup = lookup_name and policy.config.dns.reverse_lookup
        watching = [o for o in (observer, self.observer) if o is not None]
        if self.capture is not None:
            pipeline = policy.pipeline
            watching.append(self.capture.recorder(session, policy.digest, pipeline.monitor))
        return SessionDriver(
            policy,
            session,
            upstream=upstream or self.upstream,
            disposal=disposal or self.disposal,
            background=self.background,
            names=self.services.resolver.verified_name if lookup else None,
            observer=(watching[0] if len(watching) == 1 else Observers(*watching))
            if watching
            else None,
        )

    async def aclose(self) -> None:
        """Let background work finish (a few seconds at most), then close everything."""
        await self.background.drain()
        await self.services.aclose()
        await self.upstream.aclose()
        if self.capture is not None:
            await self.capture.aclose()


def build(
    config: Config,
    *,
    checks: Checks = DEFAULT_CHECKS,
    share: int = 1,
    resolver: Resolver | None = None,
    state: StateStore | None = None,
    upstream: Upstream | None = None,
    disposal: Disposal | None = None,
    observer: Observer | None = None,
    capture: bool = True,
    counted: bool = True,
) -> App:
    """The application for `config`, with `checks` (the registry's by default).

    `share`: how many worker processes share the limits (each takes its part of
    max_sessions). `resolver`, `state`, `upstream` and `disposal` replace the
    configured ones (explain's dry upstream, a replay's recorded DNS); `observer`
    sees every session. `capture` False: never record, whatever [capture] says
    (explain, replay). `counted` False: decisions and sessions count in no metric
    (a replay: its process exports none, and its decisions are not the running
    filter's). ConfigError lists every problem at once: the upstream's
    and the store's files, each rule table, the certificate, so that one
    `spamgate check` shows all there is to fix.
    """
    problems: list[str] = []
    if state is None:
        try:
            state = build_store(config)
        except ConfigError as exc:
            problems += exc.problems
            # Go on with the in-process store, whose files were the problem.
            state = build_store(dataclasses.replace(config, state=StateSettings()))
    resolver = resolver or DnsResolver(config.dns)
    recording: Capture | None = None
    wanted: CaptureSettings | None = config.sections.get("capture")
    if capture and wanted is not None and wanted.enabled:
        recording = Capture(config)
        problems += recording.problems(config)
        resolver, state = RecordingResolver(resolver), RecordingStore(state)
    services = Services(resolver=resolver, state=state)
    if upstream is None and not config.listeners:
        # Only the milter: Postfix has the mail, spamgate relays none.
        upstream = DryUpstream(keep=False)
    if upstream is None:
        try:
            upstream = build_upstream(config)
        except ConfigError as exc:
            problems += exc.problems
            # Go on without upstream TLS, whose files were the problem, to find the rest.
            plain = dataclasses.replace(config.upstream, tls="off")
            upstream = build_upstream(dataclasses.replace(config, upstream=plain))
    if disposal is None:
        quarantine = config.resolve_path(config.server.quarantine)
        disposal = Quarantine(MaildirUpstream(quarantine, config.hostname))
    policy: Policy | None = None
    try:
        policy = build_policy(config, services, checks, counted=counted)
    except ConfigError as exc:
        problems += [p for p in exc.problems if p not in problems]
    if problems or policy is None:
        raise ConfigError(problems)
    return App(
        config,
        checks,
        services,
        upstream,
        disposal,
        policy,
        share=share,
        observer=observer,
        capture=recording,
        counted=counted,
    )


# -- what the sessions of one process share ---------------------------------------------


class Runtime:
    """The current policy, and the sessions of this process: counts and stress."""

    def __init__(self, policy: Policy, share: int = 1) -> None:
        self.policy = policy
        # Workers sharing the limits: this process takes 1/share of max_sessions.
        self.share = share
        self.active = 0
        self.per_client: collections.Counter[IPAddress] = collections.Counter()
        self.closing = False
        self.loaded_at = time.time()
        # Open front-end sessions (each with a `stress()` method), for shutdown.
        self.sessions: set = set()
        # Problems that made the last reload fail (empty when it succeeded): health.
        self.reload_problems: list[str] = []
        # Near max_sessions: shorter timeouts, like Postfix's ${stress} (see `stressed`).
        self.stressed = False
        # New clients are refused from this descriptor number on (descriptors.watermark).
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
        metrics.declare_core(policy.pipeline.series())
        metrics.note_config(policy.digest, self.loaded_at)

    def swap(self, policy: Policy) -> None:
        self.policy = policy
        self.loaded_at = time.time()
        self._note_policy(policy)

    @property
    def max_sessions(self) -> int:
        """This process's share of [limits] max_sessions."""
        return -(-self.policy.config.limits.max_sessions // self.share)

    def admit(self, address: IPAddress, fd: int = -1, frontend: str = "proxy") -> str | None:
        """Count a new session; the refusal reason if a limit is reached.

        `fd` is the client socket's descriptor: accept() returns the lowest free
        one, so at least `fd` others are open, and above `fd_watermark` the
        sessions already admitted would have none left for their upstream.
        """
        limits = self.policy.config.limits
        if self.closing:
            return "shutdown"
        if self.active >= self.max_sessions:
            return "max_sessions"
        if self.fd_watermark is not None and fd >= self.fd_watermark:
            return "fd_limit"
        if self.per_client[address] >= limits.sessions_per_client:
            return "per_client"
        self.active += 1
        self.per_client[address] += 1
        metrics.child(metrics.SESSIONS_ACTIVE, frontend).inc()
        self._check_stress()
        return None

    def release(self, address: IPAddress, frontend: str = "proxy") -> None:
        self.active -= 1
        metrics.child(metrics.SESSIONS_ACTIVE, frontend).dec()
        self.per_client[address] -= 1
        if self.per_client[address] <= 0:
            del self.per_client[address]
        self._check_stress()

    def _check_stress(self) -> None:
        """Enter or leave stress as the session count crosses the threshold.

        Under stress every session waits `stress_idle_timeout` / `stress_data_timeout`
        instead of the usual minutes, so that clients holding sessions open without
        using them (slowloris) cannot crowd out the ones that send mail. Sessions
        already waiting are told at once, not at their next command. The threshold
        is a share of this process's own sessions: with several workers each takes
        its part of max_sessions, and is under stress near that part.
        """
        limits = self.policy.config.limits
        threshold = limits.stress_threshold * self.max_sessions
        stressed = limits.stress_threshold > 0 and self.active >= threshold
        if stressed == self.stressed:
            return
        self.stressed = stressed
        metrics.STRESS.set(int(stressed))
        if stressed:
            log.warning(
                "under stress: %d sessions (max_sessions %d); timeouts now %gs idle, %gs data",
                self.active,
                self.max_sessions,
                limits.stress_idle_timeout,
                limits.stress_data_timeout,
            )
            for session in list(self.sessions):
                session.stress()
        else:
            log.info("no longer under stress: %d sessions", self.active)
