"""The SMTP upstream: aiosmtplib, with XCLIENT so Postfix sees the real client.

aiosmtplib does the framing, reply parsing and timeouts; this module only decides
what to send and turns the library's exceptions into the two things the core cares
about: an upstream reply to relay, or an `UpstreamError`.

The message itself is not given to aiosmtplib's `data()`: that takes the whole
message as one bytes object and runs two regular expressions over all of it on the
event loop (about 150 ms for 5 MB, during which no other session moves), and it
holds several copies. Our content is already canonical (CRLF only), so `data()`
below sends DATA, then streams the message block by block, dot-stuffed with a
`bytes.replace`, waiting for the socket to drain between blocks, then the final dot.

With `[upstream] pool_size`, a connection whose client session ended cleanly is
kept and handed to the next client session, which introduces its own client with
XCLIENT and EHLO: no connect, greeting, EHLO of our own or QUIT per session (a
quarter of spamgate's CPU per message, bench/README.md). "Cleanly" is strict,
because Postfix keeps per-connection state across XCLIENT (smtpd.c: the error and
junk-command counts are forgiven only by a delivered message): a connection is
reused only if it is connected, outside a transaction, never authenticated, and
has had no error reply since its last delivery. Postfix also judges XCLIENT
against the identity in force, so a second XCLIENT on one connection needs the
first client to be authorized too (`smtpd_authorized_xclient_hosts = static:all`
on spamgate's own loopback listener; docs/performance.md). When the upstream
refuses it, or stops offering XCLIENT after one, the session gets a new
connection and reuse is switched off for a while, as without a pool.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import aiosmtplib
from aiosmtplib import SMTPResponse

from .. import metrics
from ..config import UpstreamSettings
from ..config.settings import parse_hostport
from ..message import Outgoing
from ..model import Client
from ..reply import Reply
from .base import Upstream, UpstreamError, UpstreamSession
from .pool import Pool
from .xclient import xclient_args

log = logging.getLogger("spamgate.upstream")

# A pooled connection is not reused after this long (Postfix's own client:
# smtp_connection_reuse_time_limit), nor after this many junk commands (EHLO,
# RSET) without a delivery: Postfix counts them, and past smtpd_junk_command_limit
# (100) each one counts as an error.
REUSE_TIME_LIMIT = 300.0
JUNK_LIMIT = 20
# After the upstream refused a second XCLIENT, try reuse again after this long
# (the admin may have changed smtpd_authorized_xclient_hosts meanwhile).
RETRY_CHAIN_AFTER = 300.0


# Commands Postfix counts as junk (smtpd_junk_command_limit) until a delivery.
_JUNK = frozenset({"ehlo", "helo", "rset", "noop"})


def dot_stuff(block: bytes, last: bytes) -> bytes:
    """Double the dot that starts a line (RFC 5321 §4.5.2) in a block of canonical
    content; `last` is the two bytes sent before it, since a line may start there."""
    out = block.replace(b"\r\n.", b"\r\n..")
    if block[:1] == b"." and last == b"\r\n":
        return b"." + out
    if block[:2] == b"\n." and last[-1:] == b"\r":
        return b"\n." + out[1:]
    return out


# Commands whose reply may be 3xx (354 to DATA, 334 during AUTH).
_INTERMEDIATE = frozenset({"data", "auth"})


def _reply(resp: SMTPResponse) -> Reply:
    return Reply.from_upstream(resp.code, resp.message)


class _TlsFailed(Exception):
    """STARTTLS towards the upstream did not happen; `open` decides what that means."""


class SmtpUpstream(Upstream):
    name = "smtp"

    def __init__(
        self,
        settings: UpstreamSettings,
        hostname: str,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.host, self.port = parse_hostport(settings.address)
        self.helo_name = settings.helo_name or hostname
        self.tls_context = tls_context
        self.tls_name = settings.tls_server_name or self.host
        self.pool: Pool[SmtpSession] = Pool(settings.pool_size, settings.pool_idle_timeout)
        # When the upstream last refused a second XCLIENT on a connection.
        self._chain_refused_at: float | None = None

    async def open(self, client: Client) -> SmtpSession:
        while (pooled := self.pool.take()) is not None:
            try:
                await pooled.reintroduce(client, self.helo_name)
            except UpstreamError as exc:
                pooled.broken = True
                self.pool.retire(pooled)
                if exc.kind == "xclient":
                    self.chain_refused()
                elif exc.reply is not None and exc.reply.code >= 500:
                    raise  # about the real client, as a new connection would say
                continue  # closed or timed out meanwhile: the next one, or a new one
            metrics.child(metrics.UPSTREAM_CONNECTIONS, "reused").inc()
            return pooled
        metrics.child(metrics.UPSTREAM_CONNECTIONS, "new").inc()
        try:
            return await self._open(client, tls=self.tls_context is not None)
        except _TlsFailed as exc:
            if self.settings.tls == "required":
                metrics.UPSTREAM_ERRORS.labels("tls").inc()
                raise UpstreamError("tls", f"upstream TLS required: {exc}") from None
            # Opportunistic, as Postfix's "may": a failed handshake falls back to
            # plaintext on a new connection rather than refusing mail.
            log.warning("upstream STARTTLS failed (%s); continuing without TLS", exc)
            metrics.UPSTREAM_ERRORS.labels("tls").inc()
            return await self._open(client, tls=False)

    async def _open(self, client: Client, *, tls: bool) -> SmtpSession:
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=s.command_timeout,
            start_tls=False,
            local_hostname=self.helo_name,
        )
        started = time.perf_counter()
        try:
            await smtp.connect(timeout=s.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as exc:
            metrics.UPSTREAM_ERRORS.labels("refused").inc()
            metrics.UPSTREAM_UP.set(0)
            raise UpstreamError("refused", f"upstream greeting {exc.code} {exc.message}") from None
        except aiosmtplib.SMTPException as exc:
            kind = "timeout" if isinstance(exc, aiosmtplib.SMTPTimeoutError) else "connect"
            metrics.UPSTREAM_ERRORS.labels(kind).inc()
            metrics.UPSTREAM_UP.set(0)
            raise UpstreamError(kind, str(exc)) from None
        except OSError as exc:
            metrics.UPSTREAM_ERRORS.labels("connect").inc()
            metrics.UPSTREAM_UP.set(0)
            raise UpstreamError("connect", str(exc)) from None
        metrics.UPSTREAM_LATENCY.labels("connect").observe(time.perf_counter() - started)
        metrics.UPSTREAM_UP.set(1)
        session = SmtpSession(smtp, s, self)
        try:
            await session.introduce(
                client,
                self.helo_name,
                xclient=s.xclient,
                tls=(self.tls_context, self.tls_name, s.tls == "required") if tls else None,
            )
        except BaseException:
            await session.close()
            raise
        return session

    async def probe(self) -> bool:
        smtp = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=5, start_tls=False)
        try:
            await smtp.connect(timeout=5)
            await smtp.quit(timeout=5)
            return True
        except (aiosmtplib.SMTPException, OSError):
            smtp.close()
            return False

    async def aclose(self) -> None:
        await self.pool.close()

    @property
    def chaining(self) -> bool:
        """May a connection be offered to another client (XCLIENT again)?"""
        refused = self._chain_refused_at
        return refused is None or time.monotonic() - refused > RETRY_CHAIN_AFTER

    def chain_refused(self) -> None:
        if self._chain_refused_at is None:
            log.warning(
                "upstream refuses XCLIENT on a connection another client used: "
                "upstream connection reuse (pool_size) is off for %.0fs; allow it with "
                "smtpd_authorized_xclient_hosts = static:all on spamgate's own listener "
                "(docs/performance.md)",
                RETRY_CHAIN_AFTER,
            )
        self._chain_refused_at = time.monotonic()
        self.pool.clear()

    def checkin(self, session: SmtpSession) -> bool:
        """Keep `session`'s connection for another client; False: it must go."""
        if self.pool.size == 0 or not (session.reusable and self.chaining):
            return False
        if self.settings.xclient and session.xclient_offered is False:
            # Not offered after the client's XCLIENT: a next one would be refused.
            self.chain_refused()
            return False
        # After HELO (offer unknown), trust the upstream: should it refuse the next
        # XCLIENT after all, that session gets a new connection and reuse stops.
        return self.pool.put(session)


class SmtpSession(UpstreamSession):
    def __init__(
        self,
        smtp: aiosmtplib.SMTP,
        settings: UpstreamSettings,
        owner: SmtpUpstream | None = None,
    ) -> None:
        self.smtp = smtp
        self.settings = settings
        self.owner = owner
        self.in_transaction = False
        self.created = self.pooled_at = time.monotonic()
        # What Postfix counts against this connection since its last delivery
        # (smtpd.c resets both only when a message was queued).
        self.errors = 0
        self.junk = 0
        self.broken = False  # an error left the connection in an unknown state
        self.authenticated = False
        # Whether the last EHLO reply offered XCLIENT (so a next client could use
        # it); None after HELO, whose reply lists nothing.
        self.xclient_offered: bool | None = None

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected

    @property
    def reusable(self) -> bool:
        """Fit for another client: known, clean state, as a new connection would be."""
        return (
            self.owner is not None
            and self.usable
            and not (self.broken or self.in_transaction or self.authenticated)
            and self.errors == 0
            and self.junk < JUNK_LIMIT
            and time.monotonic() - self.created < REUSE_TIME_LIMIT
        )

    @property
    def tls_active(self) -> bool:
        return self.smtp.get_transport_info("sslcontext") is not None

    async def _command(self, name: str, *args: bytes, timeout: float | None = None) -> Reply:
        started = time.perf_counter()
        try:
            resp = await self.smtp.execute_command(
                *args, timeout=timeout or self.settings.command_timeout
            )
        except aiosmtplib.SMTPTimeoutError as exc:
            self.broken = True
            metrics.UPSTREAM_ERRORS.labels("timeout").inc()
            raise UpstreamError("timeout", f"{name}: {exc}") from None
        except aiosmtplib.SMTPResponseException as exc:
            self.broken = True
            metrics.UPSTREAM_ERRORS.labels("protocol").inc()
            raise UpstreamError("protocol", f"{name}: {exc.message}") from None
        except (aiosmtplib.SMTPException, ConnectionError, OSError) as exc:
            self.broken = True
            metrics.UPSTREAM_ERRORS.labels("disconnect").inc()
            raise UpstreamError("disconnect", f"{name}: {exc}") from None
        if resp.code < 200 or (300 <= resp.code < 400 and name not in _INTERMEDIATE):
            # A 1xx, or a 3xx where only DATA and AUTH may have one: the upstream
            # and we no longer agree where the dialogue is. Relayed, a 354 to MAIL
            # or after the dot would tell the client something untrue.
            self.broken = True
            metrics.UPSTREAM_ERRORS.labels("protocol").inc()
            raise UpstreamError("protocol", f"{name}: unexpected reply {resp.code}")
        metrics.child(metrics.UPSTREAM_LATENCY, name).observe(time.perf_counter() - started)
        if resp.code >= 400:
            self.errors += 1
        if name in _JUNK:
            self.junk += 1
        if resp.code == 421:
            # The upstream is closing; relay its words, then the core ends the session.
            self.smtp.close()
        return _reply(resp)

    async def _hello(self, name: str, esmtp: bool) -> None:
        verb = b"EHLO" if esmtp else b"HELO"
        reply = await self._command(verb.decode().lower(), verb, name.encode("ascii"))
        if reply.code != 250:
            raise UpstreamError(
                "protocol", f"upstream refused {verb.decode()} {name}: {reply}", reply
            )
        if esmtp:
            self.smtp.last_ehlo_response = SMTPResponse(reply.code, reply.text)
            self.xclient_offered = "xclient" in self.smtp.esmtp_extensions
        else:
            self.smtp.last_helo_response = SMTPResponse(reply.code, reply.text)
            self.xclient_offered = None

    async def starttls(self, context: ssl.SSLContext, server_name: str, required: bool) -> None:
        """STARTTLS, then EHLO again (RFC 3207 §4.2: what was learnt before is void)."""
        if not self.smtp.supports_extension("starttls"):
            if required:
                raise _TlsFailed("the upstream does not offer STARTTLS")
            return
        started = time.perf_counter()
        try:
            await self.smtp.starttls(tls_context=context, server_hostname=server_name)
        except aiosmtplib.SMTPResponseException as exc:
            raise _TlsFailed(f"STARTTLS refused: {exc.code} {exc.message}") from None
        except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
            self.smtp.close()
            raise _TlsFailed(f"handshake failed: {exc}") from None
        metrics.UPSTREAM_LATENCY.labels("starttls").observe(time.perf_counter() - started)

    async def introduce(
        self,
        client: Client,
        our_name: str,
        *,
        xclient: bool,
        tls: tuple[ssl.SSLContext, str, bool] | None = None,
    ) -> None:
        """EHLO (STARTTLS, EHLO), then XCLIENT with the real client and its own EHLO."""
        await self._hello(our_name, True)
        if tls is not None:
            await self.starttls(*tls)
            if self.tls_active:
                await self._hello(our_name, True)
        if not xclient:
            return
        await self._xclient(client, our_name)

    async def reintroduce(self, client: Client, our_name: str) -> None:
        """A pooled connection for a new client: XCLIENT and its EHLO (no XCLIENT:
        our own EHLO again, which also proves the connection is still there)."""
        if self.settings.xclient:
            await self._xclient(client, our_name)
        else:
            await self._hello(our_name, True)

    async def _xclient(self, client: Client, our_name: str) -> None:
        offered = self.smtp.esmtp_extensions.get("xclient")
        if offered is None:
            metrics.UPSTREAM_ERRORS.labels("xclient").inc()
            raise UpstreamError(
                "xclient",
                "upstream does not offer XCLIENT: authorise us with "
                "smtpd_authorized_xclient_hosts, or set [upstream] xclient = false",
            )
        attrs = {a.upper() for a in offered.split()}
        reply = await self._command("xclient", b"XCLIENT", *xclient_args(client, attrs))
        # Postfix's smtpd says 220 (a new greeting); Postfix's own smtp-sink says 250.
        if reply.code // 100 == 2:
            await self._hello(client.helo or our_name, client.esmtp or not client.helo)
            return
        if reply.code in (550, 501, 503) or reply.code < 400:
            metrics.UPSTREAM_ERRORS.labels("xclient").inc()
            raise UpstreamError("xclient", f"upstream refused XCLIENT: {reply}")
        # Any other refusal is about the real client (e.g. 421, 554): relay it.
        raise UpstreamError("refused", f"upstream refused the client at XCLIENT: {reply}", reply)

    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.smtp.esmtp_extensions.get("auth", "").upper().split())

    async def auth(self, line: bytes) -> Reply:
        # One raw line, never logged: it carries credentials. Errors name the step only.
        self.authenticated = True  # never offered to another client afterwards
        return await self._command("auth", line)

    async def mail(self, sender: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        enc = "utf-8" if smtputf8 else "ascii"
        arg = b"FROM:<" + sender.encode(enc, "surrogateescape") + b">"
        reply = await self._command("mail", b"MAIL", arg, *(p.encode(enc) for p in params))
        self.in_transaction = reply.code == 250
        return reply

    async def rcpt(self, recipient: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        enc = "utf-8" if smtputf8 else "ascii"
        arg = b"TO:<" + recipient.encode(enc, "surrogateescape") + b">"
        return await self._command("rcpt", b"RCPT", arg, *(p.encode(enc) for p in params))

    async def data(self, content: Outgoing) -> Reply:
        self.in_transaction = False
        reply = await self._command("data", b"DATA")
        if reply.code != 354:
            if reply.code >= 400:
                return reply
            self.broken = True
            metrics.UPSTREAM_ERRORS.labels("protocol").inc()
            raise UpstreamError("protocol", f"unexpected reply to DATA: {reply.code}")
        try:
            await self._send_content(content)
        except (aiosmtplib.SMTPException, ConnectionError, OSError) as exc:
            self.broken = True
            metrics.UPSTREAM_ERRORS.labels("disconnect").inc()
            self.smtp.close()
            raise UpstreamError("disconnect", f"data: {exc}") from None
        except TimeoutError:
            self.broken = True
            metrics.UPSTREAM_ERRORS.labels("timeout").inc()
            self.smtp.close()
            raise UpstreamError("timeout", "data: the upstream stopped reading") from None
        # The final dot: a command line of its own, answered after the whole message.
        reply = await self._command("dot", b".", timeout=self.settings.data_timeout)
        if reply.code // 100 == 2:
            # Postfix forgives the connection's errors and junk commands once a
            # message is queued (smtpd.c); so does the pool.
            self.errors = self.junk = 0
        return reply

    async def _send_content(self, content: Outgoing) -> None:
        protocol = self.smtp.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        last = b"\r\n"  # what was sent last: the 354 exchange ended a line
        async for block in content.ablocks():
            if not block:
                continue
            protocol.write(dot_stuff(block, last))
            last = (last + block[-2:])[-2:]
            # Flow control: wait while the socket's buffer is over its high-water mark.
            # aiosmtplib's protocol has no public drain; _drain_helper is the stdlib
            # FlowControlMixin method it copies (pinned: aiosmtplib<6; tests cover it).
            async with asyncio.timeout(self.settings.command_timeout):
                await protocol._drain_helper()
        if last != b"\r\n":
            protocol.write(b"\r\n")  # never the case for content read by spamgate

    async def rset(self) -> None:
        if not self.in_transaction:
            return
        reply = await self._command("rset", b"RSET")
        if reply.code != 250:
            raise UpstreamError("protocol", f"upstream RSET: {reply}")
        self.in_transaction = False

    async def close(self) -> None:
        """Back to the pool if it is fit for another client; otherwise QUIT."""
        if self.owner is not None and self.owner.checkin(self):
            return
        await self.quit()

    def abandon(self) -> None:
        self.smtp.close()

    async def quit(self) -> None:
        if not self.smtp.is_connected:
            return
        try:
            await self.smtp.quit(timeout=5)
        except (aiosmtplib.SMTPException, OSError, ConnectionError):
            pass
        finally:
            self.smtp.close()
