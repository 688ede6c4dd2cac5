"""One client session, stage by stage: checks first, then the upstream in lock-step.

The protocol layer (`smtp.protocol`) parses the wire and calls one method per
command; this module decides what happens: it runs the stage's checks, applies
delayed rejection, relay control and score thresholds, drives the upstream session
and chooses the reply. Two rules are kept here and nowhere else:

* the client gets a 2xx for the final dot only when the upstream said 250 for that
  message (or spamgate itself took it: DISCARD, HOLD); any upstream failure becomes
  `451 4.3.0`;
* content spamgate refuses never reaches the upstream: the upstream transaction is
  reset before DATA is ever sent.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import authresults, metrics
from .checks.base import CheckContext, TransactionEnd
from .message import Header, Message, Outgoing, render_headers
from .model import Recipient, Session, Stage, Transaction
from .reply import OK, TEMP_UPSTREAM, Reply
from .smtp.commands import PathArg
from .upstream.base import UpstreamError, UpstreamSession
from .verdict import Action, Outcome, Symbol, Verdict

if TYPE_CHECKING:
    from .pipeline import Trace
    from .runtime import Policy, Runtime

log = logging.getLogger("spamgate.session")

MAIL_OK = Reply(250, "2.1.0", ("Ok",))
RCPT_OK = Reply(250, "2.1.5", ("Ok",))
DISCARDED = Reply(250, "2.0.0", ("Ok",))
SCORE_REJECT = "Message refused as spam (score {score:.1f})"
SCORE_DEFER = "Message deferred as possible spam (score {score:.1f}), try again later"
AUTH_TEMP = Reply(454, "4.7.0", ("Temporary authentication failure",))
AUTH_MECH = Reply(504, "5.5.4", ("Unsupported authentication mechanism",))
AUTH_ABORTED = Reply(501, "5.7.0", ("Authentication aborted",))


class SessionLog(logging.LoggerAdapter):
    """Prefixes every line of a session with its id."""

    def process(self, msg, kwargs):  # type: ignore[override]
        return f"sid={self.extra['sid']} {msg}", kwargs


@dataclass
class _TxnState:
    """Bookkeeping for the transaction log line and the outcome metric."""

    refused: list[Reply] = field(default_factory=list)
    upstream_refused: list[Reply] = field(default_factory=list)
    broken: bool = False  # upstream lost inside this transaction
    disposal: Verdict | None = None  # DISCARD or HOLD decided before end of data


class SessionFlow:
    def __init__(self, runtime: Runtime, session: Session) -> None:
        self.runtime = runtime
        # The rules a session starts with are the rules it finishes with.
        self.policy: Policy = runtime.policy
        self.config = self.policy.config
        self.session = session
        self.log = SessionLog(log, {"sid": session.id})
        self.upstream: UpstreamSession | None = None
        self._txn_state = _TxnState()
        self._session_disposal: Verdict | None = None
        # Which stage held the session-level rejection or disposal: a new HELO
        # replaces what the previous HELO decided, never what connect decided.
        self._pending_stage: Stage | None = None
        self._disposal_stage: Stage | None = None
        self._connect_marks = (0, 0)  # session symbols, headers after connect
        self._txn_lines = 0  # transaction lines logged
        # Sees every check's verdict (spamgate explain); see Pipeline.run.
        self.trace: Trace | None = None

    # -- helpers ---------------------------------------------------------------------

    @property
    def txn(self) -> Transaction | None:
        return self.session.transaction

    async def _run(
        self, stage: Stage, recipient: Recipient | None = None, message: Message | None = None
    ) -> Outcome:
        ctx = CheckContext(stage, self.session, self.txn, recipient, message)
        # Authenticated clients (AUTH passthrough) skip the checks the admin chose.
        skip = self.policy.auth_skip if self.session.client.login is not None else frozenset()
        outcome = await self.policy.pipeline.run(ctx, self.log, self.trace, skip=skip)
        target = (
            self.session if stage in (Stage.CONNECT, Stage.HELO) or self.txn is None else self.txn
        )
        target.symbols.extend(self._scored(outcome.symbols))
        # Headers inform, they refuse nothing: monitor mode adds them too.
        target.headers.extend(outcome.headers)
        return outcome

    def _scored(self, symbols: list[Symbol]) -> list[Symbol]:
        overrides = self.config.scoring.symbols
        return [Symbol(s.name, overrides.get(s.name, s.score)) for s in symbols]

    def _all_symbols(self) -> list[Symbol]:
        """Each symbol counts once, however many checks, lines or recipients found it."""
        seen: dict[str, Symbol] = {}
        for sym in self.session.symbols + (self.txn.symbols if self.txn else []):
            seen.setdefault(sym.name, sym)
        return list(seen.values())

    def _score(self) -> float:
        return sum(s.score for s in self._all_symbols())

    def _score_verdict(self) -> Verdict | None:
        """Compare the total score to the thresholds; None if below both."""
        s = self.config.scoring
        score = self._score()
        if s.reject and score >= s.reject:
            return Verdict(
                Action.REJECT,
                Reply(550, "5.7.1", (SCORE_REJECT.format(score=score),)),
                rule="score:reject",
            )
        if s.tempfail and score >= s.tempfail:
            return Verdict(
                Action.DEFER,
                Reply(451, "4.7.1", (SCORE_DEFER.format(score=score),)),
                rule="score:tempfail",
            )
        return None

    def _apply_score(self, stage: Stage) -> Verdict | None:
        verdict = self._score_verdict()
        if verdict is None:
            return None
        label = verdict.action.value
        if self.policy.pipeline.monitor:
            metrics.WOULD_VERDICTS.labels(stage.value, "score", label).inc()
            self.log.info("monitor: score %.1f would %s at %s", self._score(), label, stage.value)
            return None
        metrics.VERDICTS.labels(stage.value, "score", label).inc()
        return verdict

    def _delayable(self, verdict: Verdict) -> bool:
        return self.config.smtp.delay_reject and verdict.action in (Action.REJECT, Action.DEFER)

    async def _abort_upstream_txn(self) -> None:
        if self.upstream is None:
            return
        try:
            await self.upstream.rset()
        except UpstreamError as exc:
            self.log.warning("upstream RSET failed (%s); dropping upstream session", exc.detail)
            await self._drop_upstream()

    async def _drop_upstream(self) -> None:
        up, self.upstream = self.upstream, None
        if up is not None:
            await up.close()

    def _upstream_failed(self, exc: UpstreamError, command: str) -> Reply:
        self.log.warning("upstream %s failed: %s: %s", command, exc.kind, exc.detail)
        return TEMP_UPSTREAM

    # -- stages ----------------------------------------------------------------------

    async def connect(self) -> Reply | None:
        """None to greet; a Reply to refuse (421/521 close; 554 = no service here)."""
        s = self.session
        s.relay_permitted = self.policy.relay.trusted(s.client.address)
        if self.config.dns.reverse_lookup:
            s.client.name = await self.runtime.services.client_name(s.client.address)
        self.log.debug("connect from %s:%d", s.client.display, s.client.port)
        outcome = await self._run(Stage.CONNECT)
        self._connect_marks = (len(s.symbols), len(s.headers))
        return self._early(outcome, Stage.CONNECT, greeting=True)

    def pregreet(self, action: str) -> Reply | None:
        """A client talked before our greeting: log, count, and apply the policy."""
        self.session.pregreet = True
        metrics.PROTOCOL_ERRORS.labels("pregreet").inc()
        self.log.info("pregreet: client talked before the greeting (action=%s)", action)
        if action == "drop":
            metrics.VERDICTS.labels("connect", "protocol", "disconnect").inc()
            return Reply(521, "5.5.1", ("Protocol error",))
        if action == "enforce" and self.session.pending is None:
            metrics.VERDICTS.labels("connect", "protocol", "reject").inc()
            self.session.pending = Verdict(
                Action.REJECT,
                Reply(550, "5.5.1", ("Protocol error: talked before greeting",)),
                rule="pregreet",
            )
        return None

    def _early(self, outcome: Outcome, stage: Stage, *, greeting: bool = False) -> Reply | None:
        """Apply a connect-, HELO- or MAIL-stage outcome; None means carry on."""
        verdict = outcome.final
        if verdict is None or verdict.action is Action.OK:
            return None
        if verdict.action in (Action.DISCARD, Action.HOLD):
            if stage is Stage.MAIL:
                self._txn_state.disposal = verdict
            else:
                self._session_disposal = verdict
                self._disposal_stage = stage
            return None
        assert verdict.reply is not None
        self.log.info(
            "%s %s at %s: %s%s",
            verdict.action.value,
            "held" if self._delayable(verdict) else "given",
            stage.value,
            verdict.reply,
            f" (rule {verdict.rule})" if verdict.rule else "",
        )
        if verdict.action is Action.DISCONNECT:
            return verdict.reply
        if self._delayable(verdict):
            if stage is Stage.MAIL:
                assert self.txn is not None
                self.txn.pending = verdict
            elif self.session.pending is None:
                self.session.pending = verdict
                self._pending_stage = stage
            return None
        if greeting and verdict.action is Action.DEFER:
            return Reply(421, verdict.reply.enhanced, verdict.reply.lines)
        return verdict.reply

    async def helo(self, name: str, esmtp: bool) -> Reply | None:
        """None for the normal HELO/EHLO reply; a Reply to refuse."""
        await self.rset(reason="helo")
        client = self.session.client
        if self.upstream is not None and (client.helo != name or client.esmtp != esmtp):
            await self._drop_upstream()  # the upstream must hear the new name via XCLIENT
        s = self.session
        # What an earlier HELO decided no longer holds (Postfix judges the last one).
        if self._pending_stage is Stage.HELO:
            s.pending, self._pending_stage = None, None
        if self._disposal_stage is Stage.HELO:
            self._session_disposal, self._disposal_stage = None, None
        del s.symbols[self._connect_marks[0] :]
        del s.headers[self._connect_marks[1] :]
        previous = client.helo, client.esmtp
        client.helo, client.esmtp = name, esmtp
        outcome = await self._run(Stage.HELO)
        refusal = self._early(outcome, Stage.HELO)
        if refusal is not None:
            # As in Postfix, a refused HELO does not count as a greeting.
            client.helo, client.esmtp = previous
        return refusal

    async def starttls(self) -> None:
        """Before the TLS handshake: forget what the client said (RFC 3207 §4.2).

        The transaction and the HELO name go, and so does the upstream session,
        which was introduced with that name: the next one is introduced afresh.
        """
        await self.rset(reason="starttls")
        await self._drop_upstream()
        client = self.session.client
        client.helo, client.esmtp, client.login = None, False, None

    def tls_started(self) -> None:
        tls = self.session.client.tls
        if tls is not None:
            metrics.STARTTLS.labels(tls.version or "unknown").inc()
            self.log.info("STARTTLS: %s, cipher %s (%s bits)", tls.version, tls.cipher, tls.bits)

    async def auth(
        self,
        mechanism: str,
        initial: str | None,
        respond: Callable[[Reply], Awaitable[bytes | None]],
    ) -> Reply:
        """AUTH passthrough: relay the SASL exchange to the upstream, which decides.

        `respond` sends a 334 challenge to the client and returns its answer line
        (without CRLF), or None when the client went away or sent no proper line.
        No line of the exchange is ever logged: it carries credentials.
        """
        client = self.session.client
        try:
            if self.upstream is None or not self.upstream.usable:
                self.upstream = await self.runtime.services.upstream.open(client)
            if mechanism not in self.upstream.auth_mechanisms():
                offered = " ".join(sorted(self.upstream.auth_mechanisms())) or "none"
                self.log.warning(
                    "auth: upstream does not offer %s (it offers: %s); enable SASL on the "
                    "upstream listener (smtpd_sasl_auth_enable, smtpd_tls_auth_only = no)",
                    mechanism,
                    offered,
                )
                metrics.AUTH_PASSTHROUGH.labels("error").inc()
                return AUTH_MECH if offered != "none" else AUTH_TEMP
            command = f"AUTH {mechanism}" + (f" {initial}" if initial is not None else "")
            answers = [initial] if initial is not None else []
            reply = await self.upstream.auth(command.encode("ascii"))
            while reply.code == 334:
                line = await respond(reply)
                if line is None:
                    # The client is gone or sent garbage: end the upstream exchange too.
                    await self._drop_upstream()
                    metrics.AUTH_PASSTHROUGH.labels("aborted").inc()
                    return AUTH_ABORTED
                answers.append(line.decode("ascii", "replace"))
                reply = await self.upstream.auth(line)
        except UpstreamError as exc:
            await self._drop_upstream()
            metrics.AUTH_PASSTHROUGH.labels("error").inc()
            if exc.reply is not None:
                return exc.reply
            self.log.warning("auth: upstream failed: %s: %s", exc.kind, exc.detail)
            return AUTH_TEMP
        if reply.code == 235:
            client.login = _login_name(mechanism, answers) or ""
            self.session.relay_permitted = True
            metrics.AUTH_PASSTHROUGH.labels("success").inc()
            self.log.info("auth: %s succeeded, sasl_username=%s", mechanism, client.login)
        else:
            metrics.AUTH_PASSTHROUGH.labels("aborted" if answers[-1:] == ["*"] else "failure").inc()
            self.log.info("auth: %s failed: %s", mechanism, reply)
        return reply

    async def mail(self, arg: PathArg) -> Reply:
        size = arg.keywords.get("SIZE")
        self.session.transaction = Transaction(
            mail_from=arg.address,
            mail_params=arg.params,
            smtputf8="SMTPUTF8" in arg.keywords,
            declared_size=int(size) if size else None,
        )
        self._txn_state = _TxnState()
        if self.session.pending is None:
            outcome = await self._run(Stage.MAIL)
            refusal = self._early(outcome, Stage.MAIL)
            if refusal is not None:
                self._txn_state.refused.append(refusal)
                self._end_txn(refusal)
                return refusal
        txn = self.session.transaction
        if self.session.pending is not None or txn.pending is not None:
            return MAIL_OK  # the rejection is given at RCPT (delayed reject)
        try:
            if self.upstream is None or not self.upstream.usable:
                self.upstream = await self.runtime.services.upstream.open(self.session.client)
            reply = await self.upstream.mail(arg.address, arg.params, txn.smtputf8)
        except UpstreamError as exc:
            await self._drop_upstream()
            # Only a refusal is relayed: a positive reply here would tell the client
            # its MAIL was accepted while the transaction is already over.
            if exc.reply is not None and exc.reply.code >= 400:
                reply = exc.reply
            else:
                reply = self._upstream_failed(exc, "MAIL")
            self._end_txn(reply)
            return reply
        if reply.code != 250:
            self._txn_state.upstream_refused.append(reply)
            self._end_txn(reply)
        return reply

    async def rcpt(self, arg: PathArg) -> Reply:
        txn = self.txn
        assert txn is not None
        rcpt = Recipient(arg.address, arg.params)
        txn.recipients.append(rcpt)
        reply = await self._rcpt_reply(rcpt)
        rcpt.accepted = reply.code // 100 == 2
        outcome = (
            "accepted"
            if rcpt.accepted
            else "relay_denied"
            if reply.code == 554 and "Relay access denied" in reply.text
            else "upstream_rejected"
            if reply in self._txn_state.upstream_refused
            else "tempfailed"
            if reply.code < 500
            else "rejected"
        )
        metrics.child(metrics.RECIPIENTS, outcome).inc()
        if not rcpt.accepted:
            self.log.info("rcpt <%s> refused: %s", arg.address, reply)
        return reply

    async def _rcpt_reply(self, rcpt: Recipient) -> Reply:
        txn = self.txn
        assert txn is not None
        pending = self.session.pending or txn.pending
        if pending is not None:
            assert pending.reply is not None
            self._txn_state.refused.append(pending.reply)
            return pending.reply
        if not self.session.relay_permitted and not self.policy.relay.accepts(rcpt.address):
            reply = self.policy.relay.denied(rcpt.address)
            metrics.VERDICTS.labels("rcpt", "relay", "reject").inc()
            self._txn_state.refused.append(reply)
            return reply
        outcome = await self._run(Stage.RCPT, recipient=rcpt)
        verdict = outcome.final
        if verdict is not None and verdict.action in (Action.DISCARD, Action.HOLD):
            self._txn_state.disposal = verdict
        elif verdict is not None and verdict.action is not Action.OK:
            assert verdict.reply is not None
            self._txn_state.refused.append(verdict.reply)
            self.log.info(
                "%s at rcpt: %s%s",
                verdict.action.value,
                verdict.reply,
                f" (rule {verdict.rule})" if verdict.rule else "",
            )
            return verdict.reply
        scored = self._apply_score(Stage.RCPT)
        if scored is not None:
            assert scored.reply is not None
            self._txn_state.refused.append(scored.reply)
            return scored.reply
        if self._txn_state.broken or self.upstream is None:
            return TEMP_UPSTREAM
        try:
            reply = await self.upstream.rcpt(rcpt.address, rcpt.params, txn.smtputf8)
        except UpstreamError as exc:
            self._txn_state.broken = True
            await self._drop_upstream()
            return self._upstream_failed(exc, "RCPT")
        if reply.code // 100 != 2:
            self._txn_state.upstream_refused.append(reply)
        return reply

    async def data(self) -> Reply | None:
        """The DATA command: None to send 354, or the refusal."""
        txn = self.txn
        assert txn is not None
        if self._txn_state.broken or (self.upstream is None and self._txn_state.disposal is None):
            return TEMP_UPSTREAM
        outcome = await self._run(Stage.DATA)
        verdict = outcome.final
        if verdict is not None and verdict.action in (Action.DISCARD, Action.HOLD):
            self._txn_state.disposal = verdict
        elif verdict is not None and verdict.action is not Action.OK:
            assert verdict.reply is not None
            await self._abort_upstream_txn()
            self._txn_state.refused.append(verdict.reply)
            self._end_txn(verdict.reply)
            return verdict.reply
        return None

    async def refuse_content(self, reply: Reply, kind: str) -> Reply:
        """The protocol layer refused the content itself (size, line ends, lines)."""
        metrics.PROTOCOL_ERRORS.labels(kind).inc()
        decider = "limits" if kind == "message_too_big" else "protocol"
        metrics.VERDICTS.labels("eod", decider, "reject" if reply.code >= 500 else "defer").inc()
        await self._abort_upstream_txn()
        self._txn_state.refused.append(reply)
        self._end_txn(reply)
        return reply

    async def message(self, msg: Message) -> Reply:
        """End of data: decide, then relay to the upstream and relay its answer."""
        try:
            return await self._message(msg)
        finally:
            msg.close()  # a spooled message's file goes now, whatever happened

    async def _message(self, msg: Message) -> Reply:
        txn = self.txn
        assert txn is not None
        txn.message = msg
        metrics.MESSAGE_SIZE.observe(msg.size)
        outcome = await self._run(Stage.EOD, message=msg)
        verdict = outcome.final
        if verdict is None or verdict.action is Action.OK:
            verdict = self._apply_score(Stage.EOD)
        metrics.SCORE.observe(self._score())
        disposal = self._txn_state.disposal or self._session_disposal
        if verdict is not None and verdict.action in (Action.DISCARD, Action.HOLD):
            disposal, verdict = verdict, None
        if verdict is not None:
            assert verdict.reply is not None
            await self._abort_upstream_txn()
            self._txn_state.refused.append(verdict.reply)
            self.log.info(
                "%s at end of data: %s%s",
                verdict.action.value,
                verdict.reply,
                f" (rule {verdict.rule})" if verdict.rule else "",
            )
            self._end_txn(verdict.reply)
            return verdict.reply
        final = msg.relayed(self._prepend_headers(), self._forged)
        if final.removed:
            self.log.info(
                "removed %d %s header field(s) claiming to be ours (RFC 8601 §5)",
                final.removed,
                authresults.NAME,
            )
        if disposal is not None:
            return await self._dispose(disposal, final)
        assert self.upstream is not None
        try:
            reply = await self.upstream.data(final)
        except UpstreamError as exc:
            await self._drop_upstream()
            reply = self._upstream_failed(exc, "DATA")
            self._end_txn(reply, size=msg.size)
            return reply
        if reply.code // 100 != 2:
            self._txn_state.upstream_refused.append(reply)
        else:
            self.session.messages += 1
            self.session.errors = 0  # Postfix: errors "without delivering mail"
        self._end_txn(reply, size=msg.size)
        return reply

    def _forged(self, header: Header) -> bool:
        """An Authentication-Results field that arrived claiming our authserv-id."""
        return header.name.lower() == authresults.NAME.lower() and authresults.claims(
            header.unfolded(), self.config.hostname
        )

    def _prepend_headers(self) -> bytes:
        # Authentication-Results first, as RFC 8601 §5 asks: above what it reports on.
        ar = authresults.build(self.config.hostname, self.session, self.txn)
        headers = [(authresults.NAME, ar), *self.session.headers]
        txn = self.txn
        if txn is not None:
            headers += txn.headers
        s = self.config.scoring
        score = self._score()
        if s.tag and score >= s.tag and self.policy.pipeline.monitor:
            metrics.WOULD_VERDICTS.labels(Stage.EOD.value, "score", "tag").inc()
            self.log.info("monitor: score %.1f would tag the message as spam", score)
        elif s.tag and score >= s.tag:
            names = ",".join(sorted({sym.name for sym in self._all_symbols()}))
            headers += [
                ("X-Spam-Flag", "YES"),
                ("X-Spam-Score", f"{score:.1f}"),
                ("X-Spam-Symbols", names or "none"),
            ]
        trace = self._trace()
        if trace is not None:
            headers.append(trace)
        return render_headers(headers)

    def _trace(self) -> tuple[str, str] | None:
        """Our Received line when the client used TLS, which XCLIENT cannot tell Postfix.

        Postfix's own Received line names the real client (XCLIENT), but from
        Postfix's point of view the hop was plaintext; this one records the
        protocol and cipher the client really used, in Postfix's wording.
        """
        c = self.session.client
        if c.tls is None:
            return None
        name = "unknown" if c.name.startswith("[") else c.name
        proto = c.proto + "S" + ("A" if c.login else "")
        bits = f"{c.tls.bits}/{c.tls.bits} bits" if c.tls.bits else "unknown bits"
        value = (
            f"from {c.helo or 'unknown'} ({name} [{c.address}])\r\n"
            f"\t(using {c.tls.version} with cipher {c.tls.cipher} ({bits}))\r\n"
            f"\tby {self.config.hostname} (spamgate) with {proto} id {self.session.id};\r\n"
            f"\t{email.utils.formatdate(localtime=True)}"
        )
        return ("Received", value)

    async def _dispose(self, verdict: Verdict, content: Outgoing) -> Reply:
        await self._abort_upstream_txn()
        txn = self.txn
        assert txn is not None
        if verdict.action is Action.DISCARD:
            self.log.info("discarded%s", f" (rule {verdict.rule})" if verdict.rule else "")
            self._end_txn(DISCARDED, size=content.size, outcome="discarded")
            return DISCARDED
        quarantine = self.runtime.services.quarantine
        try:
            session = await quarantine.open(self.session.client)
            await session.mail(txn.mail_from, (), txn.smtputf8)
            for r in txn.accepted_recipients:
                await session.rcpt(r.address, (), txn.smtputf8)
            reply = await session.data(content)
        except UpstreamError as exc:
            reply = self._upstream_failed(exc, "quarantine")
            self._end_txn(reply, size=content.size)
            return reply
        self.log.info("quarantined%s: %s", f" (rule {verdict.rule})" if verdict.rule else "", reply)
        self._end_txn(reply, size=content.size, outcome="quarantined")
        return reply

    async def rset(self, reason: str = "rset") -> Reply:
        if self.txn is not None:
            await self._abort_upstream_txn()
            self._end_txn(None, outcome=None, reason=reason)
        return OK

    async def close(self, reason: str) -> None:
        """The session ends (QUIT, timeout, disconnect, shutdown)."""
        if self.txn is not None:
            self._end_txn(None, outcome=None, reason=reason)
        await self._drop_upstream()
        s = self.session
        # The transaction lines tell a session that ended normally; this one is
        # for the others (no transaction, errors, timeouts, lost connections).
        normal = self._txn_lines > 0 and reason == "quit" and s.errors == 0
        self.log.log(
            logging.DEBUG if normal else logging.INFO,
            "disconnect from %s: %s, messages=%d, errors=%d, %.3fs",
            s.client.display,
            reason,
            s.messages,
            s.errors,
            time.monotonic() - s.started,
        )

    # -- the per-transaction log line ----------------------------------------------------

    def _end_txn(
        self,
        reply: Reply | None,
        *,
        size: int | None = None,
        outcome: str | None = None,
        reason: str | None = None,
    ) -> None:
        txn = self.txn
        if txn is None:
            return
        st = self._txn_state
        if outcome is None:
            if reply is not None and reply.code // 100 == 2:
                outcome = "accepted"
            elif reply is not None and (reply in st.refused):
                outcome = "tempfailed" if reply.code < 500 else "rejected"
            elif reply is not None and reply == TEMP_UPSTREAM:
                outcome = "tempfailed"
            elif reply is not None:
                outcome = "upstream_rejected"
            elif not txn.accepted_recipients and st.refused:
                outcome = "rejected" if any(r.code >= 500 for r in st.refused) else "tempfailed"
            elif not txn.accepted_recipients and st.upstream_refused:
                outcome = "upstream_rejected"
            else:
                outcome = "aborted"
        metrics.child(metrics.TRANSACTIONS, outcome).inc()
        self._notify(txn, outcome)
        c = self.session.client
        to = ",".join(f"<{r.address}>" for r in txn.recipients) or "-"
        parts = [
            f"client={c.display}:{c.port}",
            f"helo={c.helo or '-'}",
            f"from=<{txn.mail_from}>",
            f"to={to}",
            f"accepted={len(txn.accepted_recipients)}",
        ]
        if size is not None:
            parts.append(f"size={size}")
        if txn.symbols or self.session.symbols:
            parts.append(f"score={self._score():.1f}")
        parts.append(f"outcome={outcome}")
        if reason:
            parts.append(f"end={reason}")
        if reply is not None:
            parts.append(f'reply="{reply}"')
        self.log.info(" ".join(parts))
        self._txn_lines += 1
        self.session.transaction = None
        self._txn_state = _TxnState()

    def _notify(self, txn: Transaction, outcome: str) -> None:
        """Tell the policy's observers how the transaction ended, off the reply path."""
        observers = self.policy.pipeline.observers
        if not observers:
            return
        event = TransactionEnd(
            client=self.session.client.address,
            trusted=self.session.relay_permitted,
            sender=txn.mail_from,
            recipients=tuple(r.address for r in txn.accepted_recipients),
            outcome=outcome,
            score=self._score(),
        )
        background = self.runtime.services.background
        for observer in observers:
            name = getattr(observer, "label", type(observer).__name__)
            background.spawn(observer.on_transaction_end(event), f"{name} outcome")


def _login_name(mechanism: str, answers: list[str]) -> str | None:
    """The SASL user name from a PLAIN or LOGIN exchange, for XCLIENT LOGIN later.

    PLAIN carries "authzid NUL authcid NUL password" (RFC 4616); LOGIN's first
    answer is the user name. The password is never kept.
    """
    if not answers:
        return None
    try:
        first = base64.b64decode(answers[0], validate=True)
    except (binascii.Error, ValueError):
        return None
    if mechanism == "PLAIN":
        parts = first.split(b"\0")
        if len(parts) != 3:
            return None
        authzid, authcid = parts[0], parts[1]
        return (authzid or authcid).decode("utf-8", "replace")
    return first.decode("utf-8", "replace")
