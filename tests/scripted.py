"""Checks driven by markers the test puts in the session, for the metrics tests.

The metrics tests need verdicts at every stage (reject, defer, discard, warn), rule
hits, and SPF, DKIM, DMARC and DNSBL results, whatever rule tables and DNS checks
exist. These two checks produce them from the envelope alone, through the same
pipeline runner as real checks (so timeouts, monitor mode and counting are the
real ones):

* `dnsbl_sim` (connect): client 127.0.0.2 is listed in both ZONES, 127.0.0.3 in
  the second only; a listing rejects with rule `dnsbl_sim:<zone>`. Every connection
  yields a listed/not_listed result per zone.
* `scripted`:
  - HELO `reject.<anything>` rejects;
  - MAIL from `reject-mail@...` rejects; from `reject-data@...` rejects at DATA;
    the sender domain `spf-<result>.test` gives that SPF result (else `none`);
  - RCPT to `reject*@`, `defer*@`, `discard*@`, `warn*@` rejects, defers,
    discards, or rejects as a WARN (logged and counted, not enforced); `boom*@`
    makes the check raise (its on_error applies);
  - at the end of data, a `Subject:` containing `reject-eod` rejects, `score N`
    adds a symbol worth N, and `X-Sim-DKIM:` / `X-Sim-DMARC:` give those results.

`python -m tests.scripted run -c FILE` runs spamgate with both registered.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spamgate import metrics
from spamgate.checks import CHECK_TYPES, Check, CheckContext
from spamgate.model import Stage
from spamgate.reply import Reply
from spamgate.verdict import DUNNO, Action, Symbol, Verdict, defer, reject

ZONES = ("zen.bl.test", "bad.bl.test")
LISTED = {"127.0.0.2": ZONES, "127.0.0.3": ZONES[1:]}


@dataclass(frozen=True)
class AuthSim:
    method: str
    result: str

    def counted(self) -> Iterable[tuple[metrics.Counter, Sequence[str]]]:
        yield metrics.AUTH_RESULTS, (self.method, self.result)


@dataclass(frozen=True)
class ContentAuthSim:
    """DKIM and DMARC results of one message (either may be missing)."""

    dkim: str | None
    dmarc: str | None

    def counted(self) -> Iterable[tuple[metrics.Counter, Sequence[str]]]:
        if self.dkim:
            yield metrics.AUTH_RESULTS, ("dkim", self.dkim)
        if self.dmarc:
            yield metrics.AUTH_RESULTS, ("dmarc", self.dmarc)


@dataclass(frozen=True)
class DnsblSim:
    listed: tuple[str, ...]

    def counted(self) -> Iterable[tuple[metrics.Counter, Sequence[str]]]:
        for zone in ZONES:
            yield metrics.DNSBL_RESULTS, (zone, "listed" if zone in self.listed else "not_listed")


class DnsblSimCheck(Check):
    name = "dnsbl_sim"
    stages = frozenset({Stage.CONNECT})

    @classmethod
    def from_config(cls, config, services) -> list[Check]:
        return [cls()]

    def metric_series(self) -> Iterable[tuple[metrics.Counter, Sequence[str]]]:
        for zone in ZONES:
            yield metrics.RULE_HITS, ("dnsbl_sim", zone)
            for result in metrics.DNSBL_RESULTS_SET:
                yield metrics.DNSBL_RESULTS, (zone, result)

    async def check(self, ctx: CheckContext) -> Verdict:
        listed = LISTED.get(str(ctx.session.client.address), ())
        result = DnsblSim(listed)
        if not listed:
            return Verdict(result=result)
        return Verdict(
            Action.REJECT,
            Reply(554, "5.7.1", (f"Service unavailable; client listed in {listed[0]}",)),
            rule=f"dnsbl_sim:{listed[0]}",
            result=result,
        )


RULES = (
    "helo-reject",
    "mail-reject",
    "rcpt-reject",
    "rcpt-defer",
    "rcpt-discard",
    "rcpt-warn",
    "data-reject",
    "eod-reject",
)


class ScriptedCheck(Check):
    name = "scripted"
    stages = frozenset(Stage)

    @classmethod
    def from_config(cls, config, services) -> list[Check]:
        return [cls()]

    def metric_series(self) -> Iterable[tuple[metrics.Counter, Sequence[str]]]:
        for rule in RULES:
            yield metrics.RULE_HITS, ("scripted", rule)

    async def check(self, ctx: CheckContext) -> Verdict:
        if ctx.stage is Stage.HELO:
            if (ctx.session.client.helo or "").startswith("reject."):
                return reject("Bad HELO", 550, rule="scripted:helo-reject")
            return DUNNO
        txn = ctx.transaction
        if ctx.stage is Stage.MAIL and txn is not None:
            domain = txn.sender_domain
            spf = domain.split(".")[0][4:] if domain.startswith("spf-") else "none"
            if txn.mail_from.startswith("reject-mail@"):
                return Verdict(
                    Action.REJECT,
                    Reply(550, "5.7.1", ("Sender refused",)),
                    rule="scripted:mail-reject",
                    result=AuthSim("spf", spf),
                )
            return Verdict(result=AuthSim("spf", spf))
        if ctx.stage is Stage.RCPT and ctx.recipient is not None:
            local = ctx.recipient.address.partition("@")[0]
            if local.startswith("reject"):
                return reject("5.1.1 No such user", 550, rule="scripted:rcpt-reject")
            if local.startswith("defer"):
                return defer("Try later", 450, rule="scripted:rcpt-defer")
            if local.startswith("discard"):
                return Verdict(Action.DISCARD, rule="scripted:rcpt-discard")
            if local.startswith("boom"):
                raise RuntimeError("scripted failure")
            if local.startswith("warn"):
                verdict = reject("Would refuse", 550, rule="scripted:rcpt-warn")
                return Verdict(verdict.action, verdict.reply, rule=verdict.rule, monitor=True)
            return DUNNO
        if ctx.stage is Stage.DATA and txn is not None:
            if txn.mail_from.startswith("reject-data@"):
                return reject("Not from you", 554, rule="scripted:data-reject")
            return DUNNO
        if ctx.stage is Stage.EOD and ctx.message is not None:
            return self._content(ctx)
        return DUNNO

    def _content(self, ctx: CheckContext) -> Verdict:
        msg = ctx.message
        assert msg is not None
        subject = " ".join(h.unfolded() for h in msg.get_all("Subject"))
        dkim = [h.unfolded() for h in msg.get_all("X-Sim-DKIM")]
        dmarc = [h.unfolded() for h in msg.get_all("X-Sim-DMARC")]
        result = ContentAuthSim(dkim[0] if dkim else None, dmarc[0] if dmarc else None)
        if "reject-eod" in subject:
            return Verdict(
                Action.REJECT,
                Reply(550, "5.7.1", ("Content refused",)),
                rule="scripted:eod-reject",
                result=result,
            )
        m = re.search(r"score (-?\d+(?:\.\d+)?)", subject)
        if m:
            return Verdict(symbols=(Symbol("SCRIPTED_SCORE", float(m.group(1))),), result=result)
        return Verdict(result=result)


SCRIPTED = [DnsblSimCheck, ScriptedCheck]


def register() -> None:
    for kind in SCRIPTED:
        if kind not in CHECK_TYPES:
            CHECK_TYPES.append(kind)


def unregister() -> None:
    for kind in SCRIPTED:
        if kind in CHECK_TYPES:
            CHECK_TYPES.remove(kind)


if __name__ == "__main__":
    from spamgate.cli import main

    register()
    sys.exit(main(sys.argv[1:]))
