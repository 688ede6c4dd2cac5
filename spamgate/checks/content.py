"""Admin rule tables for message content: header and body lines, at end of data.

Like the envelope tables, each configured table is one check, labelled with its
file name. Every header line (or body line) is looked up in the table; per line
the first match wins, as in Postfix's header_checks and body_checks. DUNNO, WARN,
PREPEND and SCORE results of all lines accumulate; the first final action ends the
table and the stage. A rule that matches many lines counts as one hit and adds its
symbol once.

Parsing and matching a large message takes time, so above `INLINE_LIMIT` bytes the
work runs in a worker thread (the regex module lets other threads run while it
matches), and a deadline bounds it as a whole, not just each match.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..model import Stage
from ..pipeline.check import CheckContext
from ..pipeline.verdict import Symbol, Verdict
from ..tables import Query, Table
from .engines.contentview import ContentLimits, ContentView, extract
from .engines.ruleverdict import ReplyContext, lookups, to_verdict
from .rules import RulesSettings, TableCheck

if TYPE_CHECKING:
    pass

# Larger messages are scanned in a worker thread (see bench/rules_lookup.py).
INLINE_LIMIT = 16384
MAX_WARNINGS = 10

CONTENT_REPLY = ReplyContext(
    reject_code=550,
    reject_text="Message content rejected",
    defer_text="Message content deferred, try again later",
)


class _Scan:
    """Accumulates the non-final results of many lines."""

    def __init__(self) -> None:
        self.symbols: dict[str, Symbol] = {}
        self.headers: list[tuple[str, str]] = []
        self.warnings: list[str] = []
        self.would: list[Verdict] = []
        self.hits: dict[tuple[str, int], None] = {}

    def add(self, verdict: Verdict) -> None:
        for s in verdict.symbols:
            self.symbols.setdefault(s.name, s)
        for h in verdict.headers:
            if h not in self.headers:
                self.headers.append(h)
        if verdict.warn and len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"{verdict.warn} ({verdict.rule})")

    def verdict(self, final: Verdict | None) -> Verdict:
        base = final or Verdict()
        warn = "; ".join(self.warnings) or None
        return replace(
            base,
            symbols=tuple(self.symbols.values()),
            headers=tuple(self.headers),
            warn=warn,
            would=tuple(self.would),
            hits=tuple(self.hits),
        )


def scan(table: Table, lines: Iterable[str], deadline: float) -> Verdict:
    """Look up every line; stop at the first final action."""
    acc = _Scan()
    for line in lines:
        for m in table.matches(Query("text", line), deadline):
            acc.hits[(m.table, m.line)] = None
            verdict = to_verdict(m.action, m.rule, CONTENT_REPLY)
            if m.action.monitor:
                if len(acc.would) < MAX_WARNINGS:
                    acc.would.append(verdict)
                continue
            if verdict.is_final:
                # A final action's own text is in its reply; keep the rest.
                return acc.verdict(replace(verdict, warn=None) if verdict.reply else verdict)
            acc.add(verdict)
            break
    return acc.verdict(None)


class ContentCheck(TableCheck):
    """A header or body table: one lookup per line of the message's content view."""

    stages = frozenset({Stage.EOD})

    def __init__(self, table: Table, settings: RulesSettings) -> None:
        super().__init__(table, settings)
        self.limits = ContentLimits(settings.scan_size, settings.body_part_size, settings.parts)

    def lines(self, view: ContentView) -> tuple[str, ...]:
        raise NotImplementedError

    async def check(self, ctx: CheckContext) -> Verdict:
        message = ctx.message
        if message is None:
            return Verdict()
        known = ctx.transaction.results.get(ContentView) if ctx.transaction else None
        deadline = time.monotonic() + self.timeout

        def work() -> tuple[ContentView, Verdict]:
            view = known or extract(message, self.limits)
            return view, scan(self.table, self.lines(view), deadline)

        with lookups():
            if message.size > INLINE_LIMIT:
                view, verdict = await asyncio.to_thread(work)
            else:
                view, verdict = work()
        # Recorded for the next content table, so the message is parsed once.
        return verdict if known is not None else replace(verdict, result=view)


class HeaderRules(ContentCheck):
    name = "header_rules"
    key = "header"
    replay_needs = "header"  # MIME part headers are in the body: none without parts

    def lines(self, view: ContentView) -> tuple[str, ...]:
        return view.headers


class BodyRules(ContentCheck):
    name = "body_rules"
    key = "body"

    def lines(self, view: ContentView) -> tuple[str, ...]:
        return view.body
