"""SpamAssassin as a scorer: the message through spamd, at end of data.

spamd (SYMBOLS, `engines/spamd.py`) gives a score, its own threshold and the rules that
hit. By default (`mode = "score"`) the score enters spamgate's scoring as the
symbol SPAMASSASSIN, worth the score times `weight`, beside DNS lists, SPF and
the rest, so [scoring] reject and tag decide; with `mode = "action"` spamd's own
verdict is followed: spam is refused (550 5.7.1). The rules that hit are shown
as `SA_<RULE>` symbols of score 0 (X-Spam-Symbols, explain), and the ones named
in `count_symbols` are counted by name.

A message larger than `max_size` is not scanned (as spamc does). spamd down or
slow is a check failure (`on_error`), logged and counted once per outage. The
check runs beside the other end-of-data checks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..config.settings import positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Action, Symbol, Verdict
from ..reply import Reply
from .engines.backend import Outage, check_address, parse_address, scanner_symbols
from .engines.spamd import SpamdError, symbols

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services


def _names(value: list[str]) -> str | None:
    for item in value:
        if not item.replace("_", "").isalnum():
            return f'"{item}" is not a rule name'
    return None


@dataclass(frozen=True)
class SpamassassinSettings:
    address: str = setting(
        "",
        'spamd: "host:port" (783 is spamd\'s port) or "unix:/path"; empty: SpamAssassin off.',
        check=check_address,
    )
    mode: Literal["score", "action"] = setting(
        "score",
        '"score": SpamAssassin\'s score, times weight, is the symbol SPAMASSASSIN in '
        "spamgate's scoring; \"action\": spam by spamd's own threshold is refused (550 5.7.1).",
    )
    weight: float = setting(1.0, "Multiplies SpamAssassin's score into the SPAMASSASSIN symbol.")
    max_size: int = setting(
        512000,
        "Larger messages are not scanned (spamc's default is 500 KB).",
        check=positive,
    )
    timeout: float = setting(
        30.0, "Seconds for one scan, connection included (then on_error).", check=positive
    )
    count_symbols: list[str] = setting(
        [],
        "SpamAssassin rule names counted in spamgate_scanner_symbols_total (a closed "
        'set, e.g. ["BAYES_99", "URIBL_BLACK"]).',
        check=_names,
    )
    on_error: Literal["continue", "tempfail"] = setting(
        "continue", 'spamd down, failing or slow: "continue" or "tempfail" (451 4.3.0).'
    )


@dataclass(frozen=True)
class SpamassassinResult:
    spam: bool = False
    score: float = 0.0
    required: float = 0.0
    rules: tuple[str, ...] = ()
    skipped: bool = False  # larger than max_size
    counting: frozenset[str] = frozenset()

    def counted(self):
        outcome = "skipped" if self.skipped else "spam" if self.spam else "ham"
        yield "spamgate_content_scans_total", ("spamassassin", outcome)
        if not self.skipped:
            yield "spamgate_scanner_score", ("spamassassin",), self.score
        for rule in self.rules:
            if rule in self.counting:
                yield "spamgate_scanner_symbols_total", ("spamassassin", rule)

    def explain(self) -> list[str]:
        if self.skipped:
            return ["spamd: not scanned (larger than max_size)"]
        verdict = "spam" if self.spam else "not spam"
        return [
            f"spamd: {verdict}, score {self.score:g} / {self.required:g}; "
            + (", ".join(self.rules[:30]) or "no rules")
        ]


class SpamassassinCheck(Check):
    section = ("spamassassin", SpamassassinSettings)
    name = "spamassassin"
    stages = frozenset({Stage.EOD})
    replay_needs = "daemon"
    concurrent = True

    def __init__(self, settings: SpamassassinSettings) -> None:
        self.settings = settings
        self.address = parse_address(settings.address)
        self.on_error = settings.on_error
        self.timeout = settings.timeout + 1.0  # the runner's backstop; the check keeps time
        self.outage = Outage(self.name, f"spamd at {settings.address}")
        self.counting = frozenset(settings.count_symbols)

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: SpamassassinSettings = config.section("spamassassin")
        return [cls(s)] if s.address else []

    def metric_series(self):
        for outcome in ("ham", "spam", "skipped"):
            yield "spamgate_content_scans_total", ("spamassassin", outcome)
        yield "spamgate_backend_outages_total", ("spamassassin",)
        for rule in sorted(self.counting):
            yield "spamgate_scanner_symbols_total", ("spamassassin", rule)

    async def check(self, ctx: CheckContext) -> Verdict:
        message = ctx.message
        if message is None or ctx.session.relay_permitted:
            return DUNNO
        s = self.settings
        if message.size > s.max_size:
            return Verdict(result=SpamassassinResult(skipped=True))
        try:
            async with asyncio.timeout(s.timeout):
                answer = await symbols(self.address, message)
        except TimeoutError:
            raise self.outage.failed(f"no answer in {s.timeout:g}s", timeout=True) from None
        except SpamdError as exc:
            raise self.outage.failed(str(exc)) from None
        self.outage.answered()
        result = SpamassassinResult(
            answer.spam, answer.score, answer.required, answer.rules, counting=self.counting
        )
        shown = scanner_symbols("SA", answer.rules)
        if s.mode == "score":
            scored = (Symbol("SPAMASSASSIN", round(answer.score * s.weight, 2)), *shown)
            return Verdict(symbols=scored, result=result)
        if not answer.spam:
            return Verdict(symbols=shown, result=result)
        text = f"Message refused as spam (SpamAssassin score {answer.score:g})"
        return Verdict(
            Action.REJECT,
            Reply.make(550, text, "5.7.1"),
            symbols=shown,
            rule="spamassassin:spam",
            result=result,
        )
