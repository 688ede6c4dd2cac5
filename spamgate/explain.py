"""`spamgate explain` and `spamgate query`: what the rules do, without sending mail.

`explain` drives one synthetic session through the real session driver, with the
real checks (DNS included), so delayed rejection, score thresholds and monitor
mode behave exactly as they do on port 25; only the upstream is a stand-in that
says 250 and keeps nothing. Each check's verdict is printed as the runner sees it.
`query` looks one key up in one table, like `postmap -q`, and says which line
answered.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from typing import TextIO

from . import app
from .config import Config
from .flow.disposal import Quarantine
from .flow.driver import SessionDriver
from .logescape import escape
from .message import Message
from .model import Client, Session, Stage
from .pipeline.check import Check
from .pipeline.entry import CoreEntry
from .pipeline.observer import Observer
from .pipeline.verdict import Action, Symbol, Verdict
from .state import MemoryStore
from .tables import Query, Table
from .tables.keys import NULL_SENDER, parse_ip
from .upstream.dry import DryUpstream

NOT_DELIVERED = "Ok: not delivered (spamgate explain)"
SYNTHETIC = (
    "From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: spamgate explain\r\n"
    "Message-ID: <explain@spamgate.invalid>\r\n\r\n(no message given)\r\n"
)


def _verdict_text(verdict: Verdict) -> str:
    if dataclasses.replace(verdict, result=None) == Verdict():
        return "no match"
    parts = []
    if verdict.action is not Action.DUNNO or not (
        verdict.symbols or verdict.headers or verdict.warn or verdict.would
    ):
        parts.append(verdict.action.name)
    if verdict.monitor:
        parts.insert(0, "WARN")
    if verdict.reply is not None:
        parts.append(str(verdict.reply))
    for sym in verdict.symbols:
        parts.append(f"{sym.name}={sym.score:g}")
    for name, value in verdict.headers:
        parts.append(f"PREPEND {name}: {value}")
    if verdict.warn:
        parts.append(f"warn: {verdict.warn}")
    if verdict.rule:
        parts.append(f"[{verdict.rule}]")
    elif verdict.hits:
        parts.append("[" + ", ".join(f"{t}:{n}" for t, n in verdict.hits) + "]")
    for would in verdict.would:
        parts.append(f"(monitor: would {would.action.value} [{would.rule}])")
    return "  ".join(parts)


class _ListHandler(logging.Handler):
    def __init__(self, out: TextIO) -> None:
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.write(f"    log: {escape(record.getMessage())}\n")


async def explain(
    config: Config,
    *,
    checks: app.Checks = app.DEFAULT_CHECKS,
    client_ip: str,
    client_name: str | None,
    helo: str,
    sender: str,
    recipients: list[str],
    message: bytes | None,
    out: TextIO,
    verbose: bool = False,
) -> int:
    """Run one synthetic session; print every verdict and the decision. 0 if accepted."""
    address = ipaddress.ip_address(client_ip)
    if client_name is not None:
        config = dataclasses.replace(
            config, dns=dataclasses.replace(config.dns, reverse_lookup=False)
        )
    dry, hold = DryUpstream(NOT_DELIVERED), DryUpstream(NOT_DELIVERED)
    # A throwaway state store too: explaining must not use up, or greylist for, a
    # real client's quota in the store the running instances share.
    built = app.build(
        config,
        checks=checks,
        upstream=dry,
        disposal=Quarantine(hold),
        state=MemoryStore(),
        capture=False,  # a synthetic session is nothing to replay
    )
    client = Client(address=address, port=0, name=client_name or "[UNAVAILABLE]")
    printer = _Printer(out, config.scoring.symbols)
    flow = built.driver(Session(id="EXPLAIN", client=client), observer=printer)
    symbols = printer.symbols
    handler = _ListHandler(out)
    loggers = [logging.getLogger("spamgate.session"), logging.getLogger("spamgate.pipeline")]
    if verbose:
        for lg in loggers:
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)
            lg.propagate = False
    if built.policy.pipeline.monitor:
        out.write('mode = "monitor": nothing is refused; would-be actions are logged\n')
    try:
        decision = await _converse(flow, dry, hold, helo, sender, recipients, message, out)
    finally:
        await flow.close("explain")
        await built.aclose()
        for lg in loggers:
            lg.removeHandler(handler)
            lg.propagate = True
    total = sum(s.score for s in symbols.values())
    listed = ", ".join(f"{s.name}={s.score:g}" for s in symbols.values()) or "no symbols"
    s = config.scoring
    out.write(f"score {total:g} ({listed}); thresholds: reject {s.reject:g}, ")
    out.write(f"tempfail {s.tempfail:g}, tag {s.tag:g}\n")
    out.write(f"decision: {decision}\n")
    return 0 if decision.startswith("accepted") else 1


class _Printer(Observer):
    """Prints each check's verdict as the runner takes it (the core's own entries
    show in the replies and the decision)."""

    def __init__(self, out: TextIO, overrides: dict[str, float]) -> None:
        self.out = out
        self.overrides = overrides
        self.symbols: dict[str, Symbol] = {}

    def verdict(
        self, stage: Stage, entry: Check | CoreEntry, verdict: Verdict, seconds: float
    ) -> None:
        if not isinstance(entry, Check):
            return
        for sym in verdict.symbols:
            score = self.overrides.get(sym.name, sym.score)
            self.symbols.setdefault(sym.name, Symbol(sym.name, score))
        self.out.write(f"  {entry.label:<24} {_verdict_text(verdict)}\n")
        # Findings that say more than the verdict (the links found and what each
        # list said; what a scanner reported), when the result can tell.
        details = getattr(verdict.result, "explain", None)
        if details is not None:
            for line in details():
                self.out.write(f"  {'':<24}   {line}\n")


def _held(flow: SessionDriver, out: TextIO) -> None:
    if flow.ledger.held.any is not None:
        out.write("     (refusal held until RCPT: delayed reject, [smtp] delay_reject)\n")


async def _converse(
    flow: SessionDriver,
    dry: DryUpstream,
    hold: DryUpstream,
    helo: str,
    sender: str,
    recipients: list[str],
    message: bytes | None,
    out: TextIO,
) -> str:
    client = flow.session.client
    out.write(f"connect from {client.display}\n")
    reply = await flow.connect()
    if reply is not None:
        out.write(f"  => {reply}\n")
        return f"refused at connect: {reply}"
    _held(flow, out)
    out.write(f"EHLO {helo}\n")
    reply = await flow.helo(helo, esmtp=True)
    out.write(f"  => {reply or '250'}\n")
    if reply is not None:
        return f"refused at HELO: {reply}"
    _held(flow, out)
    out.write(f"MAIL FROM:<{sender}>\n")
    reply = await flow.mail(sender, (), {})
    out.write(f"  => {reply}\n")
    if reply.code != 250:
        return f"refused at MAIL: {reply}"
    _held(flow, out)
    refused: list[str] = []
    for rcpt in recipients:
        out.write(f"RCPT TO:<{rcpt}>\n")
        reply = await flow.rcpt(rcpt, ())
        out.write(f"  => {reply}\n")
        if reply.code // 100 != 2:
            refused.append(f"<{rcpt}> {reply}")
            if reply.closes:
                return f"disconnected at RCPT: {reply}"
    txn = flow.session.transaction
    if txn is None or not txn.accepted_recipients:
        return "refused at RCPT: " + "; ".join(refused)
    out.write("DATA\n")
    reply = await flow.data()
    if reply is not None:
        out.write(f"  => {reply}\n")
        return f"refused at DATA: {reply}"
    content = message or SYNTHETIC.format(sender=sender, rcpt=recipients[0]).encode()
    reply = (await flow.message(Message(content))).reply
    out.write(f"end of data ({len(content)} bytes)\n  => {reply}\n")
    if reply.code // 100 != 2:
        return f"refused at end of data: {reply}"
    if hold.delivered is not None:
        return "accepted and quarantined (HOLD)"
    if dry.delivered is None:
        return "accepted and discarded (DISCARD)"
    added = dry.delivered.added.decode("utf-8", "replace")
    for line in added.splitlines():
        out.write(f"  added header: {line}\n")
    if dry.delivered.removed:
        out.write(f"  removed {dry.delivered.removed} forged Authentication-Results field(s)\n")
    note = f"; {len(refused)} recipient(s) refused" if refused else ""
    return f"accepted, would be relayed{note}"


# ---- spamgate query ------------------------------------------------------------------

QUERY_KINDS = {
    "client": "client",
    "helo": "domain",
    "sender": "address",
    "recipient": "address",
    "header": "text",
    "body": "text",
}


def make_query(key: str, stage: str | None) -> Query:
    """The query for KEY: as `stage` says, or guessed (an address, a mail address, a name)."""
    if stage is None:
        if parse_ip(key) is not None and not key.startswith("["):
            stage = "client"
        elif "@" in key or key == NULL_SENDER:
            stage = "sender"
        else:
            stage = "helo"
    kind = QUERY_KINDS[stage]
    if kind == "client":
        # "1.2.3.4", "host.example", or Postfix's "host.example[1.2.3.4]"
        name, bracket, rest = key.partition("[")
        if bracket and key.endswith("]"):
            return Query("client", name=name or None, ip=parse_ip(rest[:-1]))
        ip = parse_ip(key)
        return Query("client", ip=ip) if ip is not None else Query("client", name=key)
    return Query(kind, key)  # type: ignore[arg-type]


def query_table(table: Table, query: Query, out: TextIO) -> int:
    """Print each match up to the first one that decides; 0 if one did, 1 if none."""
    for m in table.matches(query):
        note = "   (monitor only: the lookup goes on)" if m.action.monitor else ""
        shown = f"   (key {m.key})" if table.kind == "hash" else ""
        out.write(f"{m.rule}: {m.action.source}{shown}{note}\n")
        if not m.action.monitor:
            return 0
    return 1
