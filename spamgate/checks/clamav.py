"""Antivirus: the message through clamd, at end of data.

The whole message as received (headers and MIME body; clamd decodes MIME and
archives itself with ScanMail/ScanArchive) is streamed to clamd with INSTREAM
(`engines/clamd.py`), at most `max_size` bytes. A virus refuses the message with
`554 5.7.0 Virus found: NAME`, or holds it in quarantine, or adds the symbol
CLAMAV_VIRUS, as `action` says. clamd down, refusing or slower than `timeout`
is a check failure: the runner applies `on_error` ("continue": the message goes
on unscanned, "tempfail": 451), and the outage is logged and counted once
(`backend.Outage`). The check runs beside the other end-of-data checks.
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
from .engines.backend import Outage, check_address, parse_address, printable
from .engines.clamd import ClamdError, instream

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services


@dataclass(frozen=True)
class ClamavSettings:
    address: str = setting(
        "",
        'clamd: "host:port" (TCPSocket) or "unix:/path" (LocalSocket, e.g. '
        '"unix:/run/clamav/clamd.ctl"); empty: no virus scanning.',
        check=check_address,
    )
    action: Literal["reject", "hold", "score"] = setting(
        "reject",
        'A virus found: "reject" (554 5.7.0 Virus found: NAME), "hold" (quarantine) or '
        '"score" (symbol CLAMAV_VIRUS with `score`).',
    )
    score: float = setting(20.0, "Score of CLAMAV_VIRUS when action is score.")
    max_size: int = setting(
        26214400,
        "Bytes of a message sent to clamd, at most clamd's StreamMaxLength (25M by "
        "default); a larger message is scanned on its first max_size bytes.",
        check=positive,
    )
    timeout: float = setting(
        30.0, "Seconds for one scan, connection included (then on_error).", check=positive
    )
    on_error: Literal["continue", "tempfail"] = setting(
        "continue",
        'clamd down, failing or slow: "continue" (the message goes on unscanned) or '
        '"tempfail" (451 4.3.0, the client retries later).',
    )


@dataclass(frozen=True)
class ClamavResult:
    infected: bool
    name: str = ""
    scanned: int = 0
    partial: bool = False

    def counted(self):
        outcome = "infected" if self.infected else "partial" if self.partial else "clean"
        yield "spamgate_content_scans_total", ("clamav", outcome)

    def explain(self) -> list[str]:
        what = f"virus {self.name}" if self.infected else "no virus"
        return [f"clamd: {what} in {self.scanned} bytes" + (" (partial)" if self.partial else "")]


class ClamavCheck(Check):
    section = ("clamav", ClamavSettings)
    name = "clamav"
    stages = frozenset({Stage.EOD})
    replay_needs = "daemon"
    concurrent = True

    def __init__(self, settings: ClamavSettings) -> None:
        self.settings = settings
        self.address = parse_address(settings.address)
        self.on_error = settings.on_error
        self.timeout = settings.timeout + 1.0  # the runner's backstop; the check keeps time
        self.outage = Outage(self.name, f"clamd at {settings.address}")

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: ClamavSettings = config.section("clamav")
        return [cls(s)] if s.address else []

    def metric_series(self):
        for outcome in ("clean", "infected", "partial"):
            yield "spamgate_content_scans_total", ("clamav", outcome)
        yield "spamgate_backend_outages_total", ("clamav",)

    async def check(self, ctx: CheckContext) -> Verdict:
        message = ctx.message
        if message is None:
            return DUNNO
        s = self.settings
        try:
            async with asyncio.timeout(s.timeout):
                answer = await instream(self.address, message, s.max_size)
        except TimeoutError:
            raise self.outage.failed(f"no answer in {s.timeout:g}s", timeout=True) from None
        except ClamdError as exc:
            raise self.outage.failed(str(exc)) from None
        self.outage.answered()
        result = ClamavResult(answer.infected, answer.name, answer.sent, answer.partial)
        if not answer.infected:
            return Verdict(result=result)
        name = printable(answer.name, 100)
        rule = f"clamav:{name}"
        if s.action == "score":
            return Verdict(symbols=(Symbol("CLAMAV_VIRUS", s.score),), rule=rule, result=result)
        if s.action == "hold":
            return Verdict(Action.HOLD, rule=rule, result=result)
        return Verdict(
            Action.REJECT,
            Reply.make(554, f"Virus found: {name}", "5.7.0"),
            rule=rule,
            result=result,
        )
