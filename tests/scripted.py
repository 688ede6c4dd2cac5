"""Stand-ins for checks that have not landed yet, for the metrics tests.

Rejections at connect, HELO, MAIL, RCPT and end of data come from real rule tables
(the rules engine). What no real check produces yet comes from these two, through
the same pipeline runner as real checks (so timeouts, monitor mode and counting
are the real ones):

* `dnsbl_sim` (connect): client 127.0.0.2 is listed in both ZONES, 127.0.0.3 in
  the second only; a listing rejects (told at RCPT). Every connection it sees
  yields a listed/not_listed result per zone.
* `scripted`:
  - MAIL: the sender domain `spf-<result>.test` gives that SPF result (else
    `none`);
  - RCPT to `boom*@` makes the check raise (its on_error applies);
  - DATA: a sender `reject-data@...` is refused at the DATA command, a stage no
    rule table covers;
  - end of data: `X-Sim-DKIM:` / `X-Sim-DMARC:` headers give those results.

`python -m tests.scripted run -c FILE` runs spamgate with both registered (after
the rule tables, where DNS checks run).
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spamgate import metrics
from spamgate.checks import CHECK_TYPES, Check, CheckContext
from spamgate.model import Stage
from spamgate.reply import Reply
from spamgate.verdict import DUNNO, Action, Verdict, reject

# Real rule tables for the same tests: file name -> lines (`[rules]` type:name).
RULE_TABLES = {
    "cidr:client.cidr": ["# refused networks", "127.0.0.9/32  REJECT Your network sends us spam"],
    "regexp:helo.regexp": [r"/^reject\./  REJECT Bad HELO"],
    "hash:sender": ["reject-mail@spf-fail.test  REJECT"],
    "hash:recipient": [
        "reject@example.test   550 5.1.1 No such user",
        "defer@example.test    DEFER Try later",
        "discard@example.test  DISCARD",
        "warn@example.test     WARN REJECT trying this out",
    ],
    "regexp:header.regexp": [
        "/^Subject: reject-eod/   REJECT",
        "/^Subject: big score/    SCORE 20 BIG_SCORE",
        "/^Subject: small score/  SCORE 2 SMALL_SCORE",
    ],
}
_STAGE_OF = {
    "client.cidr": "client",
    "helo.regexp": "helo",
    "sender": "sender",
    "recipient": "recipient",
    "header.regexp": "header",
}


def write_rules(directory: pathlib.Path) -> str:
    """Write RULE_TABLES into `directory`; the `[rules]` section that uses them."""
    lines = ["[rules]"]
    for spec, content in RULE_TABLES.items():
        name = spec.split(":", 1)[1]
        (directory / name).write_text("\n".join(content) + "\n")
        lines.append(f'{_STAGE_OF[name]} = ["{spec}"]')
    return "\n".join(lines) + "\n"


def rule(table: str, text: str) -> tuple[str, str]:
    """(table, line) of the rule of RULE_TABLES whose line contains `text`."""
    (content,) = [c for spec, c in RULE_TABLES.items() if spec.endswith(":" + table)]
    (line,) = [i for i, row in enumerate(content, 1) if text in row]
    return table, str(line)


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


class ScriptedCheck(Check):
    name = "scripted"
    stages = frozenset(Stage)

    @classmethod
    def from_config(cls, config, services) -> list[Check]:
        return [cls()]

    async def check(self, ctx: CheckContext) -> Verdict:
        txn = ctx.transaction
        if ctx.stage is Stage.MAIL and txn is not None:
            domain = txn.sender_domain
            spf = domain.split(".")[0][4:] if domain.startswith("spf-") else "none"
            return Verdict(result=AuthSim("spf", spf))
        if ctx.stage is Stage.RCPT and ctx.recipient is not None:
            if ctx.recipient.address.startswith("boom"):
                raise RuntimeError("scripted failure")
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
        dkim = [h.unfolded() for h in msg.get_all("X-Sim-DKIM")]
        dmarc = [h.unfolded() for h in msg.get_all("X-Sim-DMARC")]
        if not dkim and not dmarc:
            return DUNNO
        return Verdict(
            result=ContentAuthSim(dkim[0] if dkim else None, dmarc[0] if dmarc else None)
        )


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
