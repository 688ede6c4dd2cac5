"""Runs the checks of one stage and turns their verdicts into one outcome.

The runner is the only place that applies a check's timeout and error policy,
monitor mode, metrics (verdicts, `Verdict.hits` rule hits, the series a
`metrics.Counted` result names) and structured results, so every check behaves
the same way under failure: an exception or a timeout is logged, counted and
recorded (`CheckFailures`, for later checks whose evidence is then missing), and
the check's `on_error` decides between "no opinion" and a temporary failure. The
first final verdict of a stage wins; symbols and headers from every check that
ran accumulate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

from . import metrics
from .checks.base import Check, CheckContext, CheckError, TransactionObserver
from .model import Stage
from .reply import Reply
from .verdict import Action, CheckFailures, Outcome, Verdict

log = logging.getLogger("spamgate.pipeline")

# Called with (stage, check, verdict, seconds) after each check, for `spamgate explain`.
Trace = Callable[[Stage, Check, Verdict, float], None]

CHECK_TEMPFAIL = Reply(451, "4.3.0", ("Temporary failure in a message check, try again later",))


class Pipeline:
    """The checks of one configuration, grouped by stage, in registration order."""

    def __init__(self, checks: Sequence[Check], *, monitor: bool = False) -> None:
        self.checks = list(checks)
        self.monitor = monitor
        self._by_stage: dict[Stage, list[Check]] = {
            stage: [c for c in self.checks if stage in c.stages] for stage in Stage
        }
        self._concurrent = {
            stage: any(c.concurrent for c in checks) for stage, checks in self._by_stage.items()
        }
        # Checks the flow tells how each transaction ended.
        self.observers: list[TransactionObserver] = [
            c for c in self.checks if isinstance(c, TransactionObserver)
        ]

    def for_stage(self, stage: Stage) -> list[Check]:
        return self._by_stage[stage]

    async def run(
        self,
        ctx: CheckContext,
        logger: logging.LoggerAdapter | None = None,
        trace: Trace | None = None,
        *,
        skip: frozenset[str] = frozenset(),
    ) -> Outcome:
        """Run the stage's checks; `trace` sees every check's verdict (spamgate explain).

        Checks labelled in `skip` ("all": every one) do not run: what AUTH passthrough
        clients are spared ([auth] skip_checks).
        """
        outcome = Outcome()
        lg = logger or log
        checks = self._by_stage[ctx.stage]
        if skip:
            checks = [c for c in checks if not ("all" in skip or c.label in skip)]
        started = time.perf_counter()
        if not self._concurrent[ctx.stage]:
            return await self._take(checks, {}, ctx, outcome, lg, trace, started)
        # Checks that wait on the network and read no other check's findings start
        # together; their verdicts are still taken in registration order, and those
        # not needed any more (an earlier final verdict) are cancelled.
        early = {
            id(c): asyncio.ensure_future(self._run_one(c, ctx, lg)) for c in checks if c.concurrent
        }
        try:
            return await self._take(checks, early, ctx, outcome, lg, trace, started)
        finally:
            pending = [t for t in early.values() if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _take(
        self,
        checks: list[Check],
        early: dict[int, asyncio.Future[Verdict]],
        ctx: CheckContext,
        outcome: Outcome,
        lg: logging.LoggerAdapter,
        trace: Trace | None,
        stage_started: float,
    ) -> Outcome:
        stage = ctx.stage.value
        for check in checks:
            task = early.get(id(check))
            started = stage_started if task is not None else time.perf_counter()
            verdict = await task if task is not None else await self._run_one(check, ctx, lg)
            if trace is not None:
                trace(ctx.stage, check, verdict, time.perf_counter() - started)
            for table, line in verdict.hits:
                metrics.RULE_HITS.labels(table, str(line)).inc()
            for would in verdict.would:
                self._would(outcome, check, would, stage, lg)
            outcome.symbols.extend(verdict.symbols)
            outcome.headers.extend(verdict.headers)
            if verdict.result is not None:
                target = ctx.session.results if ctx.transaction is None else ctx.transaction.results
                target.put(verdict.result)
                metrics.count_result(verdict.result)
            if verdict.warn:
                lg.info("warn: %s: %s%s", check.label, verdict.warn, _rule(verdict))
            if not verdict.is_final:
                continue
            if verdict.action.refuses and (self.monitor or verdict.monitor):
                self._would(outcome, check, verdict, stage, lg)
                continue
            metrics.VERDICTS.labels(stage, check.label, verdict.action.value).inc()
            outcome.final = verdict
            break
        return outcome

    @staticmethod
    def _would(
        outcome: Outcome, check: Check, verdict: Verdict, stage: str, lg: logging.LoggerAdapter
    ) -> None:
        outcome.would.append(verdict)
        metrics.WOULD_VERDICTS.labels(stage, check.label, verdict.action.value).inc()
        lg.info(
            "monitor: %s would %s at %s: %s%s",
            check.label,
            verdict.action.value,
            stage,
            verdict.reply or verdict.warn or "",
            _rule(verdict),
        )

    async def _run_one(self, check: Check, ctx: CheckContext, lg: logging.LoggerAdapter) -> Verdict:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(check.timeout):
                verdict = await check.check(ctx)
        except TimeoutError:
            return self._failed(check, ctx, "timeout", f"timed out after {check.timeout:g}s", lg)
        except asyncio.CancelledError:
            raise
        except CheckError as exc:
            if exc.result is not None:
                metrics.count_result(exc.result)
            return self._failed(check, ctx, exc.kind, str(exc), lg, quiet=exc.quiet)
        except Exception as exc:
            lg.exception("check %s failed", check.label)
            return self._failed(check, ctx, "exception", f"{type(exc).__name__}: {exc}", lg)
        finally:
            metrics.child(metrics.CHECK_DURATION, check.label).observe(
                time.perf_counter() - started
            )
        return verdict

    @staticmethod
    def _failed(
        check: Check,
        ctx: CheckContext,
        kind: str,
        detail: str,
        lg: logging.LoggerAdapter,
        *,
        quiet: bool = False,
    ) -> Verdict:
        metrics.CHECK_ERRORS.labels(check.label, kind).inc()
        results = ctx.session.results if ctx.transaction is None else ctx.transaction.results
        results.put((results.get(CheckFailures) or CheckFailures()).add(check.label, kind))
        level = logging.DEBUG if quiet else logging.WARNING
        lg.log(level, "check %s %s; on_error=%s", check.label, detail, check.on_error)
        if check.on_error == "tempfail":
            return Verdict(Action.DEFER, CHECK_TEMPFAIL, rule=f"{check.label}:error")
        return Verdict()


def _rule(verdict: Verdict) -> str:
    return f" (rule {verdict.rule})" if verdict.rule else ""
