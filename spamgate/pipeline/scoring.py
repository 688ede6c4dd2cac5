"""Scores: the symbols a session collects, and the thresholds that act on their sum.

Checks and rules name symbols with the score they suggest; `[scoring] symbols`
overrides a score by name. A symbol counts once per transaction however many
checks, lines or recipients found it: the session's (connect, HELO) and the
transaction's together. The sum is compared with `[scoring]` reject and tempfail
after the checks of each RCPT and at the end of data (`ScoreThresholds`), and with
tag at the end of data (`SpamTag`: the X-Spam headers); both are core entries, so
monitor mode turns them into "would" lines like any check's refusal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..config import ScoringSettings
from ..model import Stage
from ..reply import Reply
from .entry import CoreEntry
from .verdict import Action, Symbol, Verdict

if TYPE_CHECKING:
    from .check import CheckContext
    from .ledger import Ledger

SCORE_REJECT = "Message refused as spam (score {score:.1f})"
SCORE_DEFER = "Message deferred as possible spam (score {score:.1f}), try again later"


class Scorer:
    """The symbols of one session: the session's own and its current transaction's."""

    __slots__ = ("_mark", "_overrides", "session", "transaction")

    def __init__(self, overrides: dict[str, float]) -> None:
        self._overrides = overrides
        self.session: list[Symbol] = []
        self.transaction: list[Symbol] = []
        self._mark = 0  # session symbols that came at connect

    def add(self, symbols: Iterable[Symbol], *, transaction: bool) -> None:
        overrides = self._overrides
        scored = [Symbol(s.name, overrides.get(s.name, s.score)) for s in symbols]
        (self.transaction if transaction else self.session).extend(scored)

    def mark_connect(self) -> None:
        self._mark = len(self.session)

    def forget_helo(self) -> None:
        """A new HELO: what the previous HELO found no longer holds."""
        del self.session[self._mark :]

    def end_transaction(self) -> None:
        self.transaction = []

    def symbols(self) -> list[Symbol]:
        """Each symbol once, however many checks, lines or recipients found it."""
        seen: dict[str, Symbol] = {}
        for sym in self.session + self.transaction:
            seen.setdefault(sym.name, sym)
        return list(seen.values())

    @property
    def total(self) -> float:
        if not (self.session or self.transaction):
            return 0.0
        return sum(s.score for s in self.symbols())

    @property
    def any(self) -> bool:
        return bool(self.session or self.transaction)


class ScoreThresholds(CoreEntry):
    """[scoring] reject and tempfail, after the checks of a RCPT or at the end of data."""

    label = "score"
    decisions = (
        (Stage.RCPT, Action.REJECT),
        (Stage.RCPT, Action.DEFER),
        (Stage.EOD, Action.REJECT),
        (Stage.EOD, Action.DEFER),
    )

    def __init__(self, settings: ScoringSettings) -> None:
        self.reject = settings.reject
        self.tempfail = settings.tempfail

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        score = ledger.scorer.total
        if self.reject and score >= self.reject:
            return Verdict(
                Action.REJECT,
                Reply(550, "5.7.1", (SCORE_REJECT.format(score=score),)),
                rule="score:reject",
            )
        if self.tempfail and score >= self.tempfail:
            return Verdict(
                Action.DEFER,
                Reply(451, "4.7.1", (SCORE_DEFER.format(score=score),)),
                rule="score:tempfail",
            )
        return None


class SpamTag(CoreEntry):
    """[scoring] tag: the X-Spam headers on a message that goes on (relayed or held)."""

    label = "score"
    decisions = ((Stage.EOD, Action.TAG),)

    def __init__(self, settings: ScoringSettings) -> None:
        self.tag = settings.tag

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        score = ledger.scorer.total
        if not (self.tag and score >= self.tag):
            return None
        names = ",".join(sorted({sym.name for sym in ledger.scorer.symbols()}))
        headers = (
            ("X-Spam-Flag", "YES"),
            ("X-Spam-Score", f"{score:.1f}"),
            ("X-Spam-Symbols", names or "none"),
        )
        return Verdict(Action.TAG, headers=headers, rule="score:tag")
