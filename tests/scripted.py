"""What the metrics tests run through spamgate: real rule tables and DNS data, and
stand-ins for the checks that do not exist yet.

Refusals at connect, HELO, MAIL, RCPT and end of data come from real rule tables
(RULE_TABLES), DNS list and SPF results from the real checks against the test DNS
server (DNS_ZONES, DNS_CHECKS). What no real check produces yet comes from one
stand-in, through the same pipeline runner as real checks (so timeouts, monitor
mode and counting are the real ones), registered after the real checks:

* `scripted`:
  - RCPT to `boom*@` makes the check raise (its on_error applies);
  - DATA: a sender `reject-data@...` is refused at the DATA command, a stage no
    rule table covers;
  - end of data: `X-Sim-DKIM:` / `X-Sim-DMARC:` headers give those results (no
    DKIM or DMARC check yet).

`python -m tests.scripted run -c FILE` runs spamgate with it registered.
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from spamgate import metrics
from spamgate.checks import CHECK_TYPES, Check, CheckContext
from spamgate.model import Stage
from spamgate.verdict import DUNNO, Verdict, reject

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


# DNS lists: 127.0.0.2 is listed in both zones, 127.0.0.3 in the second only; each
# listing weighs 1 and 1 refuses. SPF: spf-pass.test allows 127.0.0.0/8,
# spf-fail.test allows nobody; other domains have no record ("none").
ZONES = ("zen.bl.test", "bad.bl.test")
LISTED = {"127.0.0.2": ZONES, "127.0.0.3": ZONES[1:]}
DNS_CHECKS = """
[dnsbl]
sites = ["zen.bl.test", "bad.bl.test"]
threshold = 1

[spf]
enabled = true
"""


def publish_dns(dns_server) -> None:
    """Publish the DNS list and SPF zones on a tests.dnsserver.DnsServer.

    Answers live 5 seconds, so traffic spread over minutes keeps asking the network
    (and the DNS panels keep having data), as a busy MX does.
    """
    ttls = {"ttl": 5, "negative_ttl": 5}
    for zone in ZONES:
        records = {
            ".".join(reversed(ip.split("."))): {"A": "127.0.0.2", "TXT": f"listed in {zone}"}
            for ip, zones in LISTED.items()
            if zone in zones
        }
        dns_server.zone(zone, records, **ttls)
    dns_server.zone("spf-pass.test", {"@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}}, **ttls)
    dns_server.zone("spf-fail.test", {"@": {"TXT": "v=spf1 -all"}}, **ttls)


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


class ScriptedCheck(Check):
    name = "scripted"
    stages = frozenset(Stage)

    @classmethod
    def from_config(cls, config, services) -> list[Check]:
        return [cls()]

    async def check(self, ctx: CheckContext) -> Verdict:
        txn = ctx.transaction
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


SCRIPTED = [ScriptedCheck]


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
