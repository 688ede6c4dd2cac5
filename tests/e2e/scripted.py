"""What the metrics tests run through spamgate: real rule tables, real checks
against real DNS data, and one scripted check for what no real check does on demand.

Refusals at connect, HELO, MAIL, RCPT and end of data come from real rule tables
(RULE_TABLES); DNS list, SPF, DKIM and DMARC results from the real checks against
the test DNS server (`publish_dns`, DNS_CHECKS) and messages signed by the test
(SIGNER). Two things no real check does on demand come from one scripted check,
through the same pipeline runner as real checks (so timeouts, monitor mode and
counting are the real ones), run after the real checks (`CHECKS`):

* `scripted`:
  - RCPT to `boom*@` makes the check raise (its on_error applies);
  - RCPT to `slow@` takes 4 s: longer than a milter with command_timeout = 2 waits;
  - DATA: a sender `reject-data@...` is refused at the DATA command, a stage no
    rule table covers.

`python -m tests.e2e.scripted run -c FILE` runs spamgate with it (`CHECKS`).
"""

from __future__ import annotations

import asyncio
import pathlib
import sys

from spamgate.app import DEFAULT_CHECKS
from spamgate.model import Stage
from spamgate.pipeline.check import Check, CheckContext
from spamgate.pipeline.verdict import DUNNO, Verdict, reject
from tests.kit.dkimkeys import Signer

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
# spf-fail.test allows nobody; other domains have no record ("none"). DKIM and
# DMARC: spf-pass.test publishes SIGNER's key and p=reject, dmarc-none.test
# publishes FAILING's key and p=none (so mail failing it is accepted); other
# domains publish neither (dkim=none for unsigned mail, dmarc=none).
ZONES = ("zen.bl.test", "bad.bl.test")
LISTED = {"127.0.0.2": ZONES, "127.0.0.3": ZONES[1:]}
SIGNER = Signer("spf-pass.test", "sel")
FAILING = Signer("dmarc-none.test", "sel")
DNS_CHECKS = """
[dnsbl]
sites = ["zen.bl.test", "bad.bl.test"]
threshold = 1

[spf]
enabled = true

[dkim]
enabled = true

[dmarc]
enabled = true
"""


def publish_dns(dns_server) -> None:
    """Publish the DNS list and SPF zones on a tests.kit.dnsserver.DnsServer.

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
    dns_server.zone(
        "spf-pass.test",
        {
            "@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"},
            SIGNER.name: {"TXT": SIGNER.record},
            "_dmarc": {"TXT": "v=DMARC1; p=reject"},
        },
        **ttls,
    )
    dns_server.zone("spf-fail.test", {"@": {"TXT": "v=spf1 -all"}}, **ttls)
    dns_server.zone(
        "dmarc-none.test",
        {FAILING.name: {"TXT": FAILING.record}, "_dmarc": {"TXT": "v=DMARC1; p=none"}},
        **ttls,
    )


def signed(content: bytes) -> bytes:
    """`content` (From: someone at spf-pass.test) signed by that domain: dkim=pass."""
    return SIGNER.sign(content)


def signed_then_changed(content: bytes) -> bytes:
    """`content` (From: someone at dmarc-none.test) signed by that domain, then its
    body changed on the way: dkim=fail, and DMARC fails (p=none: accepted)."""
    return FAILING.sign(content) + b"a line added after signing\r\n"


class ScriptedCheck(Check):
    name = "scripted"
    stages = frozenset({Stage.RCPT, Stage.DATA})

    @classmethod
    def from_config(cls, config, services) -> list[Check]:
        return [cls()]

    async def check(self, ctx: CheckContext) -> Verdict:
        txn = ctx.transaction
        if ctx.stage is Stage.RCPT and ctx.recipient is not None:
            if ctx.recipient.address.startswith("boom"):
                raise RuntimeError("scripted failure")
            if ctx.recipient.address.startswith("slow@"):
                await asyncio.sleep(4)
            return DUNNO
        if ctx.stage is Stage.DATA and txn is not None and txn.mail_from.startswith("reject-data@"):
            return reject("Not from you", 554, rule="scripted:data-reject")
        return DUNNO


# What the metrics tests run: the registry's checks, then the scripted one.
CHECKS = (*DEFAULT_CHECKS, ScriptedCheck)


if __name__ == "__main__":
    from spamgate.cli import main

    sys.exit(main(sys.argv[1:], checks=CHECKS))
