"""Runs each stage's entries, the checks and the core's own, in order, and records
what they decide.

The runner is the only place that applies a check's timeout and error policy,
takes a verdict (symbols, prepended headers, the structured result for later
stages, the series a result names), logs a decision, applies monitor mode (to
what is not mandatory), and counts decisions in spamgate_verdicts_total
(`_enforce`, the one function that does). So every decision behaves the same way
whoever made it, and an exception or a timeout in a check is logged, counted and
recorded (`CheckFailures`, for later checks whose evidence is then missing) before
the check's `on_error` decides between "no opinion" and a temporary failure.

A stage is a list of phases; within a phase, the first final verdict ends it, as
in a Postfix restriction list. A later phase runs only after the outcomes it
names: the score thresholds run after the RCPT's checks unless they refused it,
the X-Spam tag only for a message that goes on. Refusals decided at connect, HELO
or MAIL are held for the first RCPT (`delayed.py`) when [smtp] delay_reject says so.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .. import metrics
from ..config import Config, ScoringSettings
from ..model import Stage
from ..reply import Reply
from .check import Check, CheckContext, CheckError, TransactionObserver
from .deadline import within
from .delayed import EARLY, HeldRefusal
from .entry import CoreEntry
from .ledger import Ledger
from .limits import ContentRefusal, Pregreet, RecipientLimit, SizeLimit
from .relay import RelayControl, RelayPolicy
from .scoring import ScoreThresholds, SpamTag
from .verdict import Action, CheckFailures, Outcome, Verdict

log = logging.getLogger("spamgate.pipeline")

CHECK_TEMPFAIL = Reply(451, "4.3.0", ("Temporary failure in a message check, try again later",))

Entry = Check | CoreEntry
_NOT_REFUSED = frozenset({None, Action.OK, Action.DISCARD, Action.HOLD})
_NONE_OR_OK = frozenset({None, Action.OK})
_WHERE = {Stage.EOD: "end of data"}
_NO_SKIP: frozenset[str] = frozenset()
_NOT_STARTED: dict[int, asyncio.Future[Verdict]] = {}  # read only: no check started early


@dataclass(frozen=True, slots=True)
class Phase:
    """Entries of a stage decided together: the first final verdict ends the phase."""

    entries: tuple[Entry, ...]
    # The phase runs when the stage's final action so far is one of these.
    after: frozenset[Action | None] = frozenset({None})
    # Not run while a refusal is held for the first RCPT (MAIL's checks).
    unless_held: bool = False
    concurrent: bool = False  # some check here may start with the stage
    # Each entry with whether it is a check (decided once, not per message).
    items: tuple[tuple[Entry, bool], ...] = ()

    def __post_init__(self) -> None:
        pairs = tuple((e, isinstance(e, Check)) for e in self.entries)
        object.__setattr__(self, "items", pairs)


@dataclass(frozen=True)
class CorePolicy:
    """The core's settings the pipeline's own entries decide by."""

    relay: RelayPolicy
    message_size: int | None = None  # None: no limit (a front end's own applies)
    recipients: int | None = None
    delay_reject: bool = True
    scoring: ScoringSettings | None = None  # None: no thresholds
    symbol_scores: dict[str, float] | None = None

    @classmethod
    def from_config(cls, config: Config) -> CorePolicy:
        return cls(
            relay=RelayPolicy(config.server.relay_domains, config.server.mynetworks),
            message_size=config.limits.message_size,
            recipients=config.limits.recipients,
            delay_reject=config.smtp.delay_reject,
            scoring=config.scoring,
            symbol_scores=config.scoring.symbols,
        )


class Pipeline:
    """One configuration's decisions, stage by stage: the core's entries and the
    checks (in registration order), and the policy that runs them."""

    def __init__(
        self,
        checks: Sequence[Check],
        core: CorePolicy,
        *,
        monitor: bool = False,
        skip: frozenset[str] = frozenset(),
        counted: bool = True,
    ) -> None:
        self.checks = list(checks)
        self.monitor = monitor
        # False: its decisions count in no metric, nor do the sessions it decides
        # (the driver asks here): a replay, whose process exports none, and whose
        # decisions are not the running filter's.
        self.counted = counted
        self.core = core
        # Check labels authenticated (AUTH passthrough) clients skip; "all": every one.
        self.auth_skip = skip
        self.relay = self.core.relay
        self.delay_reject = self.core.delay_reject
        self.symbol_scores = self.core.symbol_scores or {}
        # Checks the driver tells how each transaction ended.
        self.observers: list[TransactionObserver] = [
            c for c in self.checks if isinstance(c, TransactionObserver)
        ]
        self.plans = self._plans()
        self._pruned: dict[tuple[Stage, frozenset[str]], tuple[Phase, ...]] = {}

    def with_checks(self, checks: Sequence[Check]) -> Pipeline:
        """The same core and mode with other checks (tests, explain)."""
        return Pipeline(
            checks, self.core, monitor=self.monitor, skip=self.auth_skip, counted=self.counted
        )

    def _plans(self) -> dict[Stage, tuple[Phase, ...]]:
        core = self.core

        def checks(stage: Stage) -> tuple[Check, ...]:
            return tuple(c for c in self.checks if stage in c.stages)

        def phase(entries: Sequence[Entry], **kw: object) -> Phase:
            concurrent = any(isinstance(e, Check) and e.concurrent for e in entries)
            return Phase(tuple(entries), concurrent=concurrent, **kw)  # type: ignore[arg-type]

        rcpt: list[Entry] = []
        if core.recipients is not None:
            rcpt.append(RecipientLimit(core.recipients))
        rcpt += [HeldRefusal(), RelayControl(core.relay), *checks(Stage.RCPT)]
        mail: list[Phase] = []
        if core.message_size is not None:
            mail.append(phase([SizeLimit(core.message_size)]))
        mail.append(phase(checks(Stage.MAIL), unless_held=True))
        after_rcpt: list[Phase] = []
        after_eod: list[Phase] = []
        if core.scoring is not None:
            after_rcpt.append(phase([ScoreThresholds(core.scoring)], after=_NOT_REFUSED))
            after_eod += [
                phase([ScoreThresholds(core.scoring)], after=_NONE_OR_OK),
                phase([SpamTag(core.scoring)], after=_NOT_REFUSED),
            ]
        return {
            Stage.CONNECT: (phase(checks(Stage.CONNECT)),),
            Stage.HELO: (phase(checks(Stage.HELO)),),
            Stage.MAIL: tuple(mail),
            Stage.RCPT: (phase(rcpt), *after_rcpt),
            Stage.DATA: (phase(checks(Stage.DATA)),),
            Stage.EOD: (phase(checks(Stage.EOD)), *after_eod),
        }

    def entries(self, stage: Stage) -> list[Entry]:
        """Every entry of a stage, in the order they run (explain, the docs)."""
        return [e for p in self.plans[stage] for e in p.entries]

    def series(self) -> list[tuple[str, str, str, bool]]:
        """(stage, label, action, may be monitored) of every decision the core can
        make with this configuration: its spamgate_verdicts_total series (and
        spamgate_monitor_verdicts_total's), created at zero when it loads."""
        found: dict[tuple[str, str, str], bool] = {}
        entries = [e for stage in Stage for e in self.entries(stage) if isinstance(e, CoreEntry)]
        for entry in entries:
            if entry.records:
                for stage, label, action in entry.series():
                    found[(stage.value, label, action.value)] = not entry.mandatory
        for stage, label, action in (
            *((stage, Pregreet.label, action) for stage, action in Pregreet.decisions),
            *ContentRefusal.all_series(),
        ):
            found[(stage.value, label, action.value)] = False
        return [(*key, monitored) for key, monitored in found.items()]

    def _plan(self, stage: Stage, skip: frozenset[str]) -> tuple[Phase, ...]:
        plan = self.plans[stage]
        if not skip:
            return plan
        key = (stage, skip)
        pruned = self._pruned.get(key)
        if pruned is None:
            pruned = self._pruned[key] = tuple(
                Phase(
                    tuple(
                        e
                        for e in p.entries
                        if not isinstance(e, Check) or not ("all" in skip or e.label in skip)
                    ),
                    p.after,
                    p.unless_held,
                    p.concurrent,
                )
                for p in plan
            )
        return pruned

    # -- running -------------------------------------------------------------------

    async def run(
        self,
        ctx: CheckContext,
        ledger: Ledger,
        logger: logging.LoggerAdapter | logging.Logger | None = None,
        *,
        authenticated: bool = False,
        plan: tuple[Phase, ...] | None = None,
    ) -> Outcome:
        """Run the stage's entries (or `plan`) and record their verdicts in `ledger`.

        An authenticated client (AUTH passthrough) is spared the checks [auth]
        skip_checks names; the core's entries always run.
        """
        outcome = Outcome()
        lg = logger or log
        if plan is None:
            plan = self._plan(ctx.stage, self.auth_skip if authenticated else _NO_SKIP)
        for phase in plan:
            before = outcome.final
            if (before.action if before is not None else None) not in phase.after:
                continue
            if not phase.entries or (phase.unless_held and ledger.held.any is not None):
                continue
            outcome.final = None  # this phase's own first final verdict ends it
            if not phase.concurrent:
                await self._take(phase.items, _NOT_STARTED, ctx, ledger, outcome, lg)
            else:
                await self._concurrently(phase.items, ctx, ledger, outcome, lg)
            if outcome.final is None:
                outcome.final = before  # nothing final here: the earlier one stands
        return outcome

    async def pregreet(
        self, ctx: CheckContext, ledger: Ledger, action: str, logger: logging.LoggerAdapter
    ) -> Outcome:
        """The client talked before the greeting: `[smtp] pregreet_action` decides."""
        entry = Pregreet(action)  # type: ignore[arg-type]
        return await self.run(ctx, ledger, logger, plan=(Phase((entry,)),))

    async def refuse_content(
        self, ctx: CheckContext, ledger: Ledger, kind: str, logger: logging.LoggerAdapter
    ) -> Outcome:
        """The front end could not take the content (`limits.CONTENT_REPLIES`)."""
        return await self.run(ctx, ledger, logger, plan=(Phase((ContentRefusal(kind),)),))

    async def _concurrently(
        self,
        entries: tuple[tuple[Entry, bool], ...],
        ctx: CheckContext,
        ledger: Ledger,
        outcome: Outcome,
        lg: logging.LoggerAdapter | logging.Logger,
    ) -> None:
        # Checks that wait on the network and read no other check's findings start
        # together; their verdicts are still taken in registration order, and those
        # not needed any more (an earlier final verdict) are cancelled.
        early = {
            id(e): asyncio.ensure_future(self._run_one(e, ctx, lg))  # type: ignore[arg-type]
            for e, is_check in entries
            if is_check and e.concurrent  # type: ignore[union-attr]
        }
        try:
            await self._take(entries, early, ctx, ledger, outcome, lg)
        finally:
            pending = [t for t in early.values() if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _take(
        self,
        entries: tuple[tuple[Entry, bool], ...],
        early: dict[int, asyncio.Future[Verdict]],
        ctx: CheckContext,
        ledger: Ledger,
        outcome: Outcome,
        lg: logging.LoggerAdapter | logging.Logger,
    ) -> None:
        stage = ctx.stage
        observer = ledger.observer
        # Only an observer wants the time an entry took (checks' own durations
        # are measured by _run_one for the histogram).
        clock = time.perf_counter if observer is not None else _no_clock
        phase_started = clock()
        for entry, is_check in entries:
            if is_check:
                task = early.get(id(entry))
                started = phase_started if task is not None else clock()
                verdict = (
                    await task if task is not None else await self._run_one(entry, ctx, lg)  # type: ignore[arg-type]
                )
            else:
                started = clock()
                decided = entry.decide(ctx, ledger)  # type: ignore[union-attr]
                if decided is None:
                    continue
                verdict = decided
                if not entry.records:  # type: ignore[union-attr]
                    # Decided, recorded and counted earlier (a held refusal): given now.
                    if observer is not None:
                        observer.verdict(stage, entry, verdict, clock() - started)
                    outcome.final, outcome.decider = verdict, entry.label
                    break
            if observer is not None:
                observer.verdict(stage, entry, verdict, clock() - started)
            self._record(entry, verdict, ctx, ledger, lg)
            if not verdict.is_final:
                if verdict.action is Action.TAG and self._monitored(entry, verdict):
                    self._would(entry, verdict, stage, lg)
                    continue
                self._keep(verdict, ctx, ledger)
                continue
            self._keep(verdict, ctx, ledger)
            if verdict.action.refuses and self._monitored(entry, verdict):
                self._would(entry, verdict, stage, lg)
                continue
            self._enforce(entry, verdict, stage, ledger, outcome, lg)
            break

    def _monitored(self, entry: Entry, verdict: Verdict) -> bool:
        """Is this verdict to be logged and counted as "would", not done?"""
        if isinstance(entry, CoreEntry):
            return self.monitor and not entry.mandatory
        return self.monitor or verdict.monitor

    def _record(
        self,
        entry: Entry,
        verdict: Verdict,
        ctx: CheckContext,
        ledger: Ledger,
        lg: logging.LoggerAdapter | logging.Logger,
    ) -> None:
        """What every verdict leaves, taken or not: rule hits, monitor-only rules
        met on the way, its structured result, a warning."""
        counted = self.counted
        if counted:
            for table, line in verdict.hits:
                metrics.RULE_HITS.labels(table, str(line)).inc()
        for would in verdict.would:
            self._would(entry, would, ctx.stage, lg)
        if verdict.result is not None:
            target = ctx.session.results if ctx.transaction is None else ctx.transaction.results
            target.put(verdict.result)
            if counted:
                metrics.count_result(verdict.result)
        if verdict.warn:
            lg.info("warn: %s: %s%s", entry.label, verdict.warn, _rule(verdict))

    @staticmethod
    def _keep(verdict: Verdict, ctx: CheckContext, ledger: Ledger) -> None:
        """Its symbols (for the score) and the header fields it prepends. Headers
        inform, they refuse nothing: monitor mode adds them too."""
        in_txn = ctx.transaction is not None and ctx.stage not in (Stage.CONNECT, Stage.HELO)
        if verdict.symbols:
            ledger.scorer.add(verdict.symbols, transaction=in_txn)
        if verdict.headers:
            ledger.add_headers(verdict.headers, transaction=in_txn)

    def _enforce(
        self,
        entry: Entry,
        verdict: Verdict,
        stage: Stage,
        ledger: Ledger,
        outcome: Outcome,
        lg: logging.LoggerAdapter | logging.Logger,
    ) -> None:
        """A final verdict, enforced: counted, logged, held for the first RCPT if
        delayed rejection says so; the one place spamgate_verdicts_total counts."""
        action = verdict.action
        if self.counted:
            metrics.child(metrics.VERDICTS, stage.value, entry.label, action.value).inc()
        outcome.final, outcome.decider = verdict, entry.label
        if action in (Action.DISCARD, Action.HOLD):
            ledger.held.dispose(stage, verdict)
            return
        if verdict.reply is None:  # OK
            return
        # A check's refusal at connect, HELO or MAIL waits for the first RCPT when
        # [smtp] delay_reject says so; the core's are given at once (the limits) or
        # always wait (pregreet).
        held = (
            stage in EARLY
            and action in (Action.REJECT, Action.DEFER)
            and (entry.always_held if isinstance(entry, CoreEntry) else self.delay_reject)
        )
        if held:
            ledger.held.hold(stage, verdict)
            outcome.held = True
        where = _WHERE.get(stage, stage.value)
        lg.info(
            "%s %sat %s: %s%s",
            action.value,
            ("held " if held else "given ") if stage in EARLY else "",
            where,
            verdict.reply,
            _rule(verdict),
        )

    def _would(
        self,
        entry: Entry,
        verdict: Verdict,
        stage: Stage,
        lg: logging.LoggerAdapter | logging.Logger,
    ) -> None:
        if self.counted:
            label = verdict.action.value
            metrics.child(metrics.WOULD_VERDICTS, stage.value, entry.label, label).inc()
        lg.info(
            "monitor: %s would %s at %s: %s%s",
            entry.label,
            verdict.action.value,
            stage.value,
            verdict.reply or verdict.warn or "",
            _rule(verdict),
        )

    async def _run_one(
        self, check: Check, ctx: CheckContext, lg: logging.LoggerAdapter | logging.Logger
    ) -> Verdict:
        counted = self.counted
        started = time.perf_counter() if counted else 0.0
        try:
            verdict = await within(check.check(ctx), check.timeout)
        except TimeoutError:
            return self._failed(check, ctx, "timeout", f"timed out after {check.timeout:g}s", lg)
        except asyncio.CancelledError:
            raise
        except CheckError as exc:
            if exc.result is not None and counted:
                metrics.count_result(exc.result)
            return self._failed(check, ctx, exc.kind, str(exc), lg, quiet=exc.quiet)
        except Exception as exc:
            lg.exception("check %s failed", check.label)
            return self._failed(check, ctx, "exception", f"{type(exc).__name__}: {exc}", lg)
        finally:
            if counted:
                metrics.child(metrics.CHECK_DURATION, check.label).observe(
                    time.perf_counter() - started
                )
        return verdict

    def _failed(
        self,
        check: Check,
        ctx: CheckContext,
        kind: str,
        detail: str,
        lg: logging.LoggerAdapter | logging.Logger,
        *,
        quiet: bool = False,
    ) -> Verdict:
        if self.counted:
            metrics.CHECK_ERRORS.labels(check.label, kind).inc()
            finding = check.failure(kind)
            if finding is not None:
                metrics.count_result(finding)
        results = ctx.session.results if ctx.transaction is None else ctx.transaction.results
        results.put((results.get(CheckFailures) or CheckFailures()).add(check.label, kind))
        level = logging.DEBUG if quiet else logging.WARNING
        lg.log(level, "check %s %s; on_error=%s", check.label, detail, check.on_error)
        if check.on_error == "tempfail":
            return Verdict(Action.DEFER, CHECK_TEMPFAIL, rule=f"{check.label}:error")
        return Verdict()


def _no_clock() -> float:
    return 0.0


def _rule(verdict: Verdict) -> str:
    return f" (rule {verdict.rule})" if verdict.rule else ""
