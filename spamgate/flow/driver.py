"""One client session, stage by stage: the pipeline decides, the upstream follows in
lock-step. Front-end neutral: events in, decisions out.

A front end (the SMTP proxy, `spamgate explain`, a milter) turns what it hears
into calls here, one per event, with the facts as data: the client (address,
port, verified name, HELO, TLS, AUTH login), MAIL with its parameters, each RCPT,
DATA, the message. Each call runs the stage's entries (`pipeline.runner`) and
answers with the reply the client gets, or None for the front end's own positive
reply (the greeting, 250 to HELO, 354). The upstream is an `Upstream`; an MTA that
already has the mail (a milter's Postfix) is one that accepts everything
(`upstream.dry.DryUpstream`), and the end of data also comes back as a structured
decision (`EndOfMessage`: refusal, DISCARD, HOLD, the header fields to add and
those to remove), so a front end that cannot rewrite the message can apply it.

Two rules are kept here and nowhere else:

* the client gets a 2xx for the final dot only when the upstream said 250 for that
  message (or spamgate itself took it: DISCARD, HOLD); any upstream failure becomes
  `451 4.3.0`;
* content spamgate refuses never reaches the upstream: the upstream transaction is
  reset before DATA is ever sent.

Its collaborators, each with what it needs handed in: the pipeline's `Ledger`
(scores, held refusals, disposals, prepended headers), the `UpstreamLink`, the
`TransactionLog`, the `HeaderBuilder`, the `SaslRelay` and the `Disposal` service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from .. import metrics
from ..background import Background
from ..message import Message, Outgoing, render_headers
from ..model import IPAddress, Recipient, Session, Stage, Transaction
from ..pipeline.check import CheckContext
from ..pipeline.ledger import Ledger
from ..pipeline.observer import Observer
from ..pipeline.policy import Policy
from ..pipeline.verdict import Action, Outcome, Verdict
from ..reply import OK, TEMP_UPSTREAM, Reply
from ..upstream.base import Upstream, UpstreamError
from .disposal import Disposal
from .headers import HeaderBuilder
from .link import UpstreamLink
from .sasl import Respond, SaslRelay
from .txnlog import TransactionLog

log = logging.getLogger("spamgate.session")

MAIL_OK = Reply(250, "2.1.0", ("Ok",))

# The client's verified reverse name, `[UNAVAILABLE]` or `[TEMPUNAVAIL]`.
NameLookup = Callable[[IPAddress], Awaitable[str]]

Decision = Literal["accept", "refuse", "discard", "hold"]


@dataclass(frozen=True)
class EndOfMessage:
    """The end of data, decided: what the client hears, and what was decided.

    `decision` is spamgate's: accept (relayed: `reply` is the upstream's), refuse
    (`reply` is ours, 4xx or 5xx: tempfail is a refusal with a 4xx code), discard,
    hold. `added` are the header fields the message gains, top first, and
    `removed` the ones it loses, as (name, occurrence among fields of that name,
    from 1): a front end that relays the bytes itself has them applied already.
    """

    reply: Reply
    decision: Decision
    rule: str | None = None
    added: tuple[tuple[str, str], ...] = ()
    removed: tuple[tuple[str, int], ...] = ()


class SessionLog(logging.LoggerAdapter):
    """Prefixes every line of a session with its id."""

    def process(self, msg, kwargs):  # type: ignore[override]
        return f"sid={self.extra['sid']} {msg}", kwargs


class SessionDriver:
    def __init__(
        self,
        policy: Policy,
        session: Session,
        *,
        upstream: Upstream,
        disposal: Disposal,
        background: Background,
        names: NameLookup | None = None,
        observer: Observer | None = None,
    ) -> None:
        # The rules a session starts with are the rules it finishes with.
        self.policy = policy
        self.pipeline = policy.pipeline
        self.session = session
        self.log = SessionLog(log, {"sid": session.id})
        self.names = names
        self.disposal = disposal
        self.ledger = Ledger(self.pipeline.symbol_scores, observer)
        self.link = UpstreamLink(upstream, session.client, self.log)
        # A pipeline that counts nothing (a replay's): nor do the sessions it decides.
        self.counted = self.pipeline.counted
        self.txnlog = TransactionLog(
            session,
            self.ledger,
            self.log,
            self.pipeline.observers,
            background,
            counted=self.counted,
        )
        self.headers = HeaderBuilder(policy.config.hostname)

    # -- helpers ---------------------------------------------------------------------

    @property
    def txn(self) -> Transaction | None:
        return self.session.transaction

    def _context(
        self,
        stage: Stage,
        txn: Transaction | None = None,
        recipient: Recipient | None = None,
        message: Message | None = None,
    ) -> CheckContext:
        return CheckContext(stage, self.session, txn, recipient, message, held=self.ledger.held.any)

    async def _run(self, ctx: CheckContext) -> Outcome:
        return await self.pipeline.run(
            ctx, self.ledger, self.log, authenticated=self.session.client.login is not None
        )

    def _hear(self, event: str, *args: object) -> None:
        """Tell the observer what the front end handed us (`Observer.command`)."""
        observer = self.ledger.observer
        if observer is not None:
            observer.command(event, args)

    def _tell(self, event: str, reply: Reply | None) -> Reply | None:
        observer = self.ledger.observer
        if observer is not None:
            observer.reply(event, reply)
        return reply

    # -- the session -----------------------------------------------------------------

    async def connect(self) -> Reply | None:
        """None to greet; a Reply to refuse (421/521 close; 554 = no service here)."""
        self._hear("connect")
        s = self.session
        s.relay_permitted = self.pipeline.relay.trusted(s.client.address)
        if self.names is not None:
            s.client.name = await self.names(s.client.address)
        if self.log.isEnabledFor(logging.DEBUG):  # its arguments cost more than the test
            self.log.debug("connect from %s:%d", s.client.display, s.client.port)
        outcome = await self._run(self._context(Stage.CONNECT))
        self.ledger.mark_connect()
        refusal = outcome.refusal
        if refusal is not None and refusal.action is Action.DEFER:
            # A temporary refusal of the whole session is a 421 (RFC 5321 §3.8).
            assert refusal.reply is not None
            return self._tell("connect", Reply(421, refusal.reply.enhanced, refusal.reply.lines))
        return self._tell("connect", refusal.reply if refusal is not None else None)

    async def client_talked_first(self, action: str) -> Reply | None:
        """The client talked before our greeting (pregreet): log, count, and apply
        [smtp] pregreet_action; a Reply closes the session."""
        self._hear("client_talked_first", action)
        self.session.pregreet = True
        if self.counted:
            metrics.PROTOCOL_ERRORS.labels("pregreet").inc()
        self.log.info("pregreet: client talked before the greeting (action=%s)", action)
        if action == "ignore":
            return None
        outcome = await self.pipeline.pregreet(
            self._context(Stage.CONNECT), self.ledger, action, self.log
        )
        refusal = outcome.refusal
        return self._tell("connect", refusal.reply if refusal is not None else None)

    async def helo(self, name: str, esmtp: bool) -> Reply | None:
        """None for the normal HELO/EHLO reply; a Reply to refuse."""
        self._hear("helo", name, esmtp)
        await self._end_transaction("helo")
        client = self.session.client
        if self.link.session is not None and (client.helo != name or client.esmtp != esmtp):
            await self.link.drop()  # the upstream must hear the new name via XCLIENT
        # What an earlier HELO decided no longer holds (Postfix judges the last one).
        self.ledger.forget_helo()
        previous = client.helo, client.esmtp
        client.helo, client.esmtp = name, esmtp
        outcome = await self._run(self._context(Stage.HELO))
        refusal = outcome.refusal
        if refusal is not None:
            # As in Postfix, a refused HELO does not count as a greeting.
            client.helo, client.esmtp = previous
        return self._tell("helo", refusal.reply if refusal is not None else None)

    async def starttls(self) -> None:
        """Before the TLS handshake: forget what the client said (RFC 3207 §4.2).

        The transaction and the HELO name go, and so does the upstream session,
        which was introduced with that name: the next one is introduced afresh.
        """
        self._hear("starttls")
        await self._end_transaction("starttls")
        await self.link.drop()
        client = self.session.client
        client.helo, client.esmtp, client.login = None, False, None

    def tls_started(self) -> None:
        self._hear("tls_started")
        tls = self.session.client.tls
        if tls is not None:
            if self.counted:
                metrics.STARTTLS.labels(tls.version or "unknown").inc()
            self.log.info("STARTTLS: %s, cipher %s (%s bits)", tls.version, tls.cipher, tls.bits)

    async def auth(self, mechanism: str, initial: str | None, respond: Respond) -> Reply:
        """AUTH passthrough: relay the SASL exchange to the upstream, which decides.

        `respond` sends a 334 challenge to the client and returns its answer line
        (without CRLF), or None when the client went away or sent no proper line.
        """
        self._hear("auth", mechanism)
        reply, login = await SaslRelay(self.link, self.log).exchange(mechanism, initial, respond)
        if login is not None:
            self.session.client.login = login
            self.session.relay_permitted = True
        return reply

    async def mail(
        self, sender: str, params: tuple[str, ...], keywords: Mapping[str, str | None]
    ) -> Reply:
        """MAIL FROM:<sender> with its parameters as sent (`keywords`: upper-cased
        keyword to value, as parsed)."""
        self._hear("mail", sender, params, keywords)
        size = keywords.get("SIZE")
        txn = Transaction(
            mail_from=sender,
            mail_params=params,
            smtputf8="SMTPUTF8" in keywords,
            declared_size=int(size) if size else None,
        )
        outcome = await self._run(self._context(Stage.MAIL, txn))
        refusal = outcome.refusal
        if refusal is not None and outcome.decider == "limits":
            assert refusal.reply is not None
            return self._tell("mail", refusal.reply)  # refused before it began
        self.session.transaction = txn
        if refusal is not None:
            assert refusal.reply is not None
            self.txnlog.refuse(refusal.reply)
            self.txnlog.end(refusal.reply)
            return self._tell("mail", refusal.reply)
        if self.ledger.held.any is not None:
            return self._tell("mail", MAIL_OK)  # the refusal is given at RCPT (delayed reject)
        self.link.broken = False
        try:
            upstream = await self.link.open()
            reply = await upstream.mail(sender, params, txn.smtputf8)
        except UpstreamError as exc:
            await self.link.drop()
            # Only a refusal is relayed: a positive reply here would tell the client
            # its MAIL was accepted while the transaction is already over.
            if exc.reply is not None and exc.reply.code >= 400:
                reply = exc.reply
            else:
                reply = self.link.failed(exc, "MAIL")
            self.txnlog.end(reply)
            return self._tell("mail", reply)
        if reply.code != 250:
            self.txnlog.upstream_refuse(reply)
            self.txnlog.end(reply)
        return self._tell("mail", reply)

    async def rcpt(self, recipient: str, params: tuple[str, ...]) -> Reply:
        """RCPT TO:<recipient> with its parameters as sent."""
        self._hear("rcpt", recipient, params)
        txn = self.txn
        assert txn is not None
        rcpt = Recipient(recipient, params)
        outcome = await self._run(self._context(Stage.RCPT, txn, rcpt))
        refusal = outcome.refusal
        if refusal is not None and outcome.decider == "limits":
            assert refusal.reply is not None
            return self._tell("rcpt", refusal.reply)  # not a recipient of this message
        txn.recipients.append(rcpt)
        if refusal is not None:
            assert refusal.reply is not None
            reply = refusal.reply
            self.txnlog.refuse(reply)
        else:
            reply = await self._relay_rcpt(txn, rcpt)
        rcpt.accepted = reply.code // 100 == 2
        self.txnlog.recipient(rcpt, reply, outcome.decider if refusal is not None else None)
        return self._tell("rcpt", reply)

    async def _relay_rcpt(self, txn: Transaction, rcpt: Recipient) -> Reply:
        upstream = self.link.session
        if self.link.broken or upstream is None:
            return TEMP_UPSTREAM
        try:
            reply = await upstream.rcpt(rcpt.address, rcpt.params, txn.smtputf8)
        except UpstreamError as exc:
            self.link.broken = True
            await self.link.drop()
            return self.link.failed(exc, "RCPT")
        if reply.code // 100 != 2:
            self.txnlog.upstream_refuse(reply)
        return reply

    async def data(self) -> Reply | None:
        """The DATA command: None to send 354, or the refusal."""
        self._hear("data")
        txn = self.txn
        assert txn is not None
        if self.link.broken or (
            self.link.session is None and self.ledger.held.txn_disposal is None
        ):
            return self._tell("data", TEMP_UPSTREAM)
        outcome = await self._run(self._context(Stage.DATA, txn))
        refusal = outcome.refusal
        if refusal is None:
            return self._tell("data", None)
        assert refusal.reply is not None
        await self.link.abort_transaction()
        self.txnlog.refuse(refusal.reply)
        self.txnlog.end(refusal.reply)
        return self._tell("data", refusal.reply)

    async def refuse_content(self, kind: str) -> Reply:
        """The front end could not take the content as it came (`kind`: message_too_big,
        header_too_big, line_too_long, bare_newline, bare_cr)."""
        self._hear("refuse_content", kind)
        outcome = await self.pipeline.refuse_content(
            self._context(Stage.EOD, self.txn), self.ledger, kind, self.log
        )
        assert outcome.final is not None and outcome.final.reply is not None
        reply = outcome.final.reply
        await self.link.abort_transaction()
        self.txnlog.refuse(reply)
        self.txnlog.end(reply)
        return self._tell("message", reply) or reply

    async def message(self, msg: Message) -> EndOfMessage:
        """End of data: decide, then relay to the upstream (or take the message
        ourselves: DISCARD, HOLD); the client hears `.reply`."""
        self._hear("message", msg)
        try:
            end = await self._message(msg)
        finally:
            msg.close()  # a spooled message's file goes now, whatever happened
        self._tell("message", end.reply)
        return end

    async def _message(self, msg: Message) -> EndOfMessage:
        txn = self.txn
        assert txn is not None
        txn.message = msg
        if self.counted:
            metrics.MESSAGE_SIZE.observe(msg.size)
        outcome = await self._run(self._context(Stage.EOD, txn, message=msg))
        if self.counted:
            metrics.SCORE.observe(self.ledger.scorer.total)
        refusal = outcome.refusal
        if refusal is not None:
            assert refusal.reply is not None
            await self.link.abort_transaction()
            self.txnlog.refuse(refusal.reply)
            self.txnlog.end(refusal.reply)
            return EndOfMessage(refusal.reply, "refuse", refusal.rule)
        added = self.headers.added(self.session, self.ledger)
        removed = self.headers.removed(msg)
        final = msg.relayed(render_headers(added), self.headers.forged if removed else None)
        if final.removed:
            self.log.info(
                "removed %d %s header field(s) claiming to be ours (RFC 8601 §5)",
                final.removed,
                "Authentication-Results",
            )
        disposal = self.ledger.held.for_message
        if disposal is not None:
            reply, decision = await self._dispose(disposal, txn, final)
            return EndOfMessage(reply, decision, disposal.rule, tuple(added), removed)
        upstream = self.link.session
        assert upstream is not None
        try:
            reply = await upstream.data(final)
        except UpstreamError as exc:
            await self.link.drop()
            reply = self.link.failed(exc, "DATA")
            self.txnlog.end(reply, size=msg.size)
            return EndOfMessage(reply, "accept", None, tuple(added), removed)
        if reply.code // 100 != 2:
            self.txnlog.upstream_refuse(reply)
        else:
            self.session.messages += 1
            self.session.errors = 0  # Postfix: errors "without delivering mail"
        self.txnlog.end(reply, size=msg.size)
        return EndOfMessage(reply, "accept", None, tuple(added), removed)

    async def _dispose(
        self, verdict: Verdict, txn: Transaction, content: Outgoing
    ) -> tuple[Reply, Decision]:
        await self.link.abort_transaction()
        rule = f" (rule {verdict.rule})" if verdict.rule else ""
        if verdict.action is Action.DISCARD:
            reply = await self.disposal.discard(self.session, txn)
            self.log.info("discarded%s", rule)
            self.txnlog.end(reply, size=content.size, outcome="discarded")
            return reply, "discard"
        try:
            reply = await self.disposal.hold(self.session, txn, content)
        except UpstreamError as exc:
            reply = self.link.failed(exc, "quarantine")
            self.txnlog.end(reply, size=content.size)
            return reply, "hold"
        self.log.info("quarantined%s: %s", rule, reply)
        self.txnlog.end(reply, size=content.size, outcome="quarantined")
        return reply, "hold"

    async def rset(self, reason: str = "rset") -> Reply:
        """RSET, or a transaction abandoned (`reason`); a no-op without one, so a
        front end may call it as often as its MTA says ABORT."""
        self._hear("rset", reason)
        await self._end_transaction(reason)
        return OK

    async def _end_transaction(self, reason: str) -> None:
        if self.txn is not None:
            await self.link.abort_transaction()
            self.txnlog.end(None, reason=reason)

    async def close(self, reason: str) -> None:
        """The session ends (QUIT, timeout, disconnect, shutdown)."""
        self._hear("close", reason)
        if self.txn is not None:
            self.txnlog.end(None, reason=reason)
        await self.link.drop()
        s = self.session
        # The transaction lines tell a session that ended normally; this one is
        # for the others (no transaction, errors, timeouts, lost connections).
        normal = self.txnlog.lines > 0 and reason == "quit" and s.errors == 0
        level = logging.DEBUG if normal else logging.INFO
        if not self.log.isEnabledFor(level):
            return
        self.log.log(
            level,
            "disconnect from %s: %s, messages=%d, errors=%d, %.3fs",
            s.client.display,
            reason,
            s.messages,
            s.errors,
            time.monotonic() - s.started,
        )
