"""The inbound SMTP protocol: aiosmtpd's connection machinery, spamgate's own rules.

aiosmtpd gives us the asyncio protocol, STARTTLS (with the CVE-2024-34083 buffer
flush) and PROXY-protocol parsing. Its command loop is replaced because a proxy in
front of Postfix needs things it does not do: commands must end in CRLF, MAIL/RCPT
parameters are passed upstream verbatim, every reply carries an enhanced status
code, errors are counted per session, pipelining is checked, and DATA is read by
`dataread`, which only ever ends on CRLF.CRLF. Everything this class decides is
about the wire; what a command means for the mail is decided by the session
driver (`flow.SessionDriver`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable

from aiosmtpd.proxy_protocol import AF, V2_CMD, V2_SIGNATURE, get_proxy
from aiosmtpd.smtp import SMTP as _AiosmtpdSMTP
from aiosmtpd.smtp import TLSSetupException, login_always_fail
from aiosmtpd.smtp import __ident__ as _AIOSMTPD_IDENT

from .. import metrics
from ..app import App
from ..config import Listener
from ..flow.driver import EndOfMessage, SessionDriver
from ..model import Client, Session, TLSInfo
from ..reply import Reply
from ..spool import Spool
from . import commands
from .dataread import DataTimeout, read_data

log = logging.getLogger("spamgate.smtp")

NOT_IMPLEMENTED = Reply(502, "5.5.1", ("Error: command not implemented",))
UNKNOWN = Reply(502, "5.5.2", ("Error: command not recognized",))
BARE_LF_COMMAND = Reply(500, "5.5.2", ("Error: bare <LF> received",))
LINE_TOO_LONG = Reply(500, "5.5.2", ("Error: command line too long",))
BAD_UTF8 = Reply(500, "5.5.2", ("Error: invalid UTF-8 in command",))
SYNC = Reply(554, "5.5.0", ("Error: SMTP protocol synchronization",))
TIMEOUT = "Error: timeout exceeded"
SHUTTING_DOWN = "Error: service shutting down"
OUT_OF_RESOURCES = "Error: out of resources, try again later"
_NON_SMTP = {"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS", "USER"}
MUST_STARTTLS = Reply(530, "5.7.0", ("Must issue a STARTTLS command first",))
TLS_ACTIVE = Reply(554, "5.5.1", ("Error: TLS already active",))
# RFC 4954 §4: servers accept AUTH lines of at least 12288 octets.
AUTH_LINE_MAX = 12288
_BASE64 = re.compile(r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$|^=$")

Address = tuple[str, int]


class _NullHandle:
    """Stands in for aiosmtpd's idle timer: timeouts here wrap each read instead."""

    def cancel(self) -> None:
        pass


class _NoHooks:
    """aiosmtpd requires a handler object; every decision is made by the session driver."""


_NO_HOOKS = _NoHooks()


def new_session_id() -> str:
    return secrets.token_hex(5).upper()


def _fast_aiosmtpd_init(
    proto: _AiosmtpdSMTP,
    *,
    hostname: str,
    data_size_limit: int,
    enable_SMTPUTF8: bool,
    tls_context: ssl.SSLContext | None,
    timeout: float,
    loop: asyncio.AbstractEventLoop,
) -> None:
    """The state aiosmtpd's `SMTP.__init__` (1.4.x) sets up, for our use of it.

    Its own __init__ runs `inspect.getmembers` and `dir()` over the protocol and the
    handler on every connection to find AUTH mechanisms, handler hooks and smtp_*
    methods: about 220 µs, a tenth of a message's CPU. None of them is used here
    (this class replaces the command loop, AUTH and the hooks), so they are empty,
    and the rest is what aiosmtpd would set with these arguments and no handler
    hooks. tests/unit/smtp/test_protocol_init.py compares the two, attribute by attribute.
    """
    asyncio.StreamReaderProtocol.__init__(
        proto,
        asyncio.StreamReader(loop=loop, limit=proto.line_length_limit),
        client_connected_cb=proto._cb_client_connected,
        loop=loop,
    )
    proto.__ident__ = _AIOSMTPD_IDENT  # type: ignore[attr-defined]
    proto.loop = loop
    proto.event_handler = _NO_HOOKS
    proto.data_size_limit = data_size_limit
    proto.enable_SMTPUTF8 = enable_SMTPUTF8
    proto._decode_data = False
    proto.hostname = hostname
    proto.tls_context = tls_context
    proto.require_starttls = tls_context and False
    proto._timeout_duration = timeout
    proto._timeout_handle = None
    proto._tls_handshake_okay = True
    proto._tls_protocol = None
    proto._original_transport = None
    proto.session = None
    proto.envelope = None
    proto.transport = None
    proto._handler_coroutine = None
    proto._auth_require_tls = True
    proto._proxy_timeout = None
    proto._authenticator = None
    proto._auth_callback = login_always_fail
    proto._auth_required = False
    proto._auth_methods = {}
    proto._handle_hooks = {}
    proto._ehlo_hook_ver = None
    proto._smtp_methods = {}
    proto._enforce_call_limit = False


class SMTPSession(_AiosmtpdSMTP):
    # The StreamReader buffer size; spamgate's own line limits apply per line.
    line_length_limit = 65536

    def __init__(self, app: App, listener: Listener | None = None) -> None:
        runtime = app.runtime
        cfg = runtime.config
        self.listener = listener or Listener(cfg.listeners[0].address)
        _fast_aiosmtpd_init(
            self,
            hostname=cfg.hostname,
            data_size_limit=cfg.limits.message_size,
            enable_SMTPUTF8=cfg.smtp.smtputf8,
            tls_context=runtime.policy.tls,
            timeout=cfg.limits.idle_timeout,
            loop=asyncio.get_running_loop(),
        )
        # Read here, not by aiosmtpd (whose client loop this class replaces).
        self._proxy_timeout = (
            cfg.server.proxy_protocol_timeout if self.listener.proxy_protocol else None
        )
        self.app = app
        self.runtime = runtime
        self.cfg = cfg
        self.model: Session | None = None
        self.flow: SessionDriver | None = None
        self._busy = False
        self._closing = False
        self._quit_seen = False
        self._no_service = False  # after a 554 greeting: 503 to all but QUIT
        self._message_task: asyncio.Task[EndOfMessage] | None = None
        # The command-read watchdog (_read_line): the pending read's deadline (loop
        # time, 0 when not reading), the same under stress, the one timer, and
        # whether it fired.
        self._read_deadline = 0.0
        self._read_stress_deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._timed_out = False
        # The deadline of another read in progress (DATA, a TLS handshake) and when
        # it ends under stress.
        self._wait: tuple[asyncio.Timeout, float] | None = None
        self._commands: dict[str, Callable[[str | None], Awaitable[None]]] = {
            "HELO": self._helo,
            "EHLO": self._ehlo,
            "MAIL": self._mail,
            "RCPT": self._rcpt,
            "DATA": self._data,
            "RSET": self._rset,
            "NOOP": self._noop,
            "QUIT": self._quit,
            "STARTTLS": self._starttls,
            "AUTH": self._auth,
            "VRFY": self._vrfy,
        }

    # -- aiosmtpd integration --------------------------------------------------------

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._timeout_handle = _NullHandle()  # type: ignore[assignment]

    def eof_received(self) -> bool | None:
        # aiosmtpd cancels the session on EOF; instead let the reader report EOF
        # after the commands already buffered (a pipelined QUIT) are answered.
        reader = self._stream_reader
        if reader is not None:
            reader.feed_eof()
        return self.session is None or self.session.ssl is None

    # -- writing -------------------------------------------------------------------

    async def _send(self, reply: Reply) -> None:
        """Write a reply; count errors; close after 421/521 or too many errors."""
        if self.transport is None or self.transport.is_closing():
            return
        model = self.model
        self._writer.write(reply.render())
        if reply.closes:
            self._close()
        elif reply.code >= 400 and model is not None:
            model.errors += 1
            if model.errors >= self.cfg.limits.errors:
                metrics.PROTOCOL_ERRORS.labels("too_many_errors").inc()
                self._writer.write(
                    Reply(421, "4.7.0", (f"{self.hostname} Error: too many errors",)).render()
                )
                self._close()
        if self.transport is not None and not self.transport.is_closing():
            await self._writer.drain()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        """Close at once, without a TLS goodbye the peer would never answer."""
        self._closing = True
        for transport in (self._original_transport, self.transport):
            if transport is not None:
                transport.abort()

    def _pending_input(self) -> bool:
        return bool(self._reader._buffer)  # type: ignore[attr-defined]

    # -- the session -------------------------------------------------------------------

    async def _handle_client(self) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        sock = self.transport.get_extra_info("sockname") if self.transport else None
        if not peer:
            self._close()
            return
        if self._proxy_timeout is not None:
            proxied = await self._read_proxy_header(peer)
            if proxied is None:
                metrics.SESSIONS_REFUSED.labels("proxy").inc()
                self._close()
                return
            peer, sock = proxied
        address = ipaddress.ip_address(peer[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        client = Client(address=address, port=int(peer[1]))
        if sock:
            client.local_address = ipaddress.ip_address(sock[0])
            client.local_port = int(sock[1])
        conn = self.transport.get_extra_info("socket") if self.transport else None
        refused = self.runtime.admit(address, conn.fileno() if conn is not None else -1)
        if refused is not None:
            metrics.SESSIONS_REFUSED.labels(refused).inc()
            log.info("refused connection from [%s]:%d: %s", address, client.port, refused)
            text = {
                "shutdown": "Error: service shutting down",
                "per_client": f"Error: too many connections from {address}",
                "fd_limit": OUT_OF_RESOURCES,
            }.get(refused, "Error: too many connections")
            enhanced = "4.3.2" if refused == "fd_limit" else "4.7.0"
            self._writer.write(Reply(421, enhanced, (f"{self.hostname} {text}",)).render())
            self._close()
            return
        metrics.child(metrics.SESSIONS, "proxy").inc()
        self.model = Session(id=new_session_id(), client=client)
        self.flow = self.app.driver(self.model)
        self.runtime.sessions.add(self)
        reason = "disconnected"
        try:
            reason = await self._converse()
        except asyncio.CancelledError:
            reason = "shutdown" if self._closing else "connection lost"
            raise
        except (ConnectionError, OSError):
            reason = "connection lost"
        except Exception:
            # A bug, not the client's doing: say so in the log and to the client,
            # rather than leaving a silent disconnect behind.
            reason = "internal error"
            log.exception("sid=%s session failed", self.model.id)
            if self.transport is not None and not self.transport.is_closing():
                self._writer.write(
                    Reply(421, "4.3.0", (f"{self.hostname} Error: internal error",)).render()
                )
        finally:
            await self._finish(reason, address)

    async def _finish(
        self, reason: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> None:
        # A message already handed to the upstream is seen through: its outcome is
        # logged even if the client went away after the final dot.
        if self._message_task is not None and not self._message_task.done():
            with contextlib.suppress(Exception):  # the flow logged it
                await asyncio.shield(self._message_task)
        try:
            if self.flow is not None:
                await asyncio.shield(self.flow.close(reason))
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()  # it holds the session until it would fire
                self._watchdog = None
            self.runtime.sessions.discard(self)
            self.runtime.release(address)
            self._close()

    async def _read_proxy_header(self, peer: Address) -> tuple[Address, Address] | None:
        """The real client and the address it connected to, from a PROXY v1/v2 header.

        aiosmtpd parses the header; this decides what it means. Like Postfix
        (haproxy_srvr.c), a header that names no client (v1 UNKNOWN, v2 UNSPEC or
        UNIX) is refused: the proxy's own address must never stand in for the
        client, as it may well be in mynetworks. A v2 LOCAL header (the balancer's
        own health check) is a connection from the balancer itself.
        """
        assert self._proxy_timeout is not None
        where = f"[{peer[0]}]:{peer[1]}"
        # Not a session yet (so `stress()` never reaches it), but a read of client
        # bytes all the same: under stress it waits no longer than a command would.
        wait = self._proxy_timeout
        if self.runtime.stressed:
            wait = min(wait, self.cfg.limits.stress_idle_timeout)
        try:
            async with asyncio.timeout(wait):
                data = await get_proxy(self._reader)
        except TimeoutError:
            log.warning("PROXY: no header from %s within %gs; closed", where, wait)
            return None
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            log.info("PROXY: %s closed before sending a header", where)
            return None
        if not data.valid:
            log.warning("PROXY: bad header from %s (%s); closed", where, data.error or "invalid")
            return None
        sock = self.transport.get_extra_info("sockname") if self.transport else None
        if data.version == 2 and data.command == V2_CMD.LOCAL:
            return peer, (sock[0], sock[1]) if sock else ("0.0.0.0", 0)
        if data.family not in (AF.INET, AF.INET6) or data.src_addr is None:
            log.warning("PROXY: header from %s names no client address; closed", where)
            return None
        return (str(data.src_addr), int(data.src_port or 0)), (
            str(data.dst_addr),
            int(data.dst_port or 0),
        )

    async def _converse(self) -> str:
        assert self.flow is not None and self.model is not None
        refusal = await self.flow.connect()
        smtp = self.cfg.smtp
        if smtp.pregreet_wait > 0:
            await asyncio.sleep(smtp.pregreet_wait)
        if self._pending_input():
            refusal = await self.flow.client_talked_first(smtp.pregreet_action) or refusal
        if refusal is not None:
            await self._send(refusal)
            if refusal.closes:
                return f"refused: {refusal.code}"
            self._no_service = True  # 554 greeting: answer 503 until QUIT (RFC 5321 §3.1)
        else:
            await self._send(Reply(220, None, (f"{self.hostname} {self.cfg.server.greeting}",)))
        return await self._command_loop()

    async def _command_loop(self) -> str:
        limits = self.cfg.limits
        while not self._closing and self.transport is not None:
            idle = limits.stress_idle_timeout if self.runtime.stressed else limits.idle_timeout
            try:
                line = await self._read_line(idle, limits.stress_idle_timeout)
            except TimeoutError:
                metrics.PROTOCOL_ERRORS.labels("timeout").inc()
                await self._send(Reply(421, "4.4.2", (f"{self.hostname} {TIMEOUT}",)))
                return "timeout"
            except asyncio.IncompleteReadError:
                return "disconnected"
            if line is None:
                metrics.PROTOCOL_ERRORS.labels("line_too_long").inc()
                await self._send(LINE_TOO_LONG)
                continue
            self._busy = True
            try:
                await self._dispatch(line)
            finally:
                self._busy = False
            if self.runtime.closing and (self.model is None or self.model.transaction is None):
                await self._send(Reply(421, "4.3.2", (f"{self.hostname} {SHUTTING_DOWN}",)))
                return "shutdown"
        return "quit" if self._quit_seen else "closed"

    async def _read_line(self, timeout: float, stressed: float) -> bytes | None:
        """`readuntil(b"\n")`, raising TimeoutError after `timeout` seconds, or
        `stressed` seconds if the server comes under stress meanwhile; None for a
        line longer than the read buffer, which is read to its end and dropped
        under the same deadline (a line that never ends must not hold the session).

        What `asyncio.timeout` does, for the one read a session waits on most,
        without a new timer per command: a session keeps one watchdog timer, moved
        only when it fires early (the deadline moves with every read), so a command
        costs a float assignment instead of a timer scheduled and cancelled.
        """
        reader = self._reader
        if b"\n" in reader._buffer:  # type: ignore[attr-defined]
            with contextlib.suppress(asyncio.LimitOverrunError):  # then timed, below
                return await reader.readuntil(b"\n")  # already here: nothing to time
        now = self.loop.time()
        self._read_stress_deadline = now + stressed
        self._arm(now + timeout)
        try:
            try:
                return await reader.readuntil(b"\n")
            except asyncio.LimitOverrunError:
                await self._skip_long_line()
                return None
        except asyncio.CancelledError:
            task = self._handler_coroutine
            if self._timed_out and task is not None:
                self._timed_out = False
                if task.uncancel() == 0:  # ours alone: a timeout, not a shutdown
                    raise TimeoutError from None
            raise
        finally:
            self._read_deadline = 0.0

    def _arm(self, deadline: float) -> None:
        """Make `deadline` the pending read's; the watchdog fires no later."""
        self._read_deadline = deadline
        watchdog = self._watchdog
        if watchdog is None or watchdog.when() > deadline:
            if watchdog is not None:
                watchdog.cancel()
            self._watchdog = self.loop.call_at(deadline, self._watch)

    def _watch(self) -> None:
        """The watchdog fired: time the read out, or wait on for a later deadline."""
        self._watchdog = None
        deadline = self._read_deadline
        if not deadline:
            return  # not waiting for a command now; the next read sets a new one
        if self.loop.time() < deadline:
            self._watchdog = self.loop.call_at(deadline, self._watch)
            return
        task = self._handler_coroutine
        if task is not None and not task.done():
            self._timed_out = True
            task.cancel()

    async def _skip_long_line(self) -> None:
        """Read and drop the rest of a line longer than the read buffer; the caller
        gives it a deadline. IncompleteReadError if the client goes away."""
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.read(exc.consumed)

    async def _dispatch(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            metrics.PROTOCOL_ERRORS.labels("bare_newline").inc()
            await self._send(BARE_LF_COMMAND)
            return
        if len(line) > self.cfg.limits.command_line_length:
            metrics.PROTOCOL_ERRORS.labels("line_too_long").inc()
            await self._send(LINE_TOO_LONG)
            return
        try:
            text = line[:-2].decode("utf-8")
        except UnicodeDecodeError:
            metrics.PROTOCOL_ERRORS.labels("syntax").inc()
            await self._send(BAD_UTF8)
            return
        verb, _, arg = text.partition(" ")
        # ASCII only: Python would upper-case "ma\u0131l" (dotless i) to MAIL.
        verb = verb.upper() if verb.isascii() else verb
        if self._proxy_timeout is None and (
            verb == "PROXY" or (line == b"\r\n" and self._buffer_startswith(V2_SIGNATURE[2:]))
        ):
            # A balancer sends PROXY headers here but this listener does not expect
            # them: going on would take the balancer for the client.
            metrics.PROTOCOL_ERRORS.labels("proxy_header").inc()
            log.warning(
                "PROXY header on %s, which has proxy_protocol = false; closed",
                self.listener.address,
            )
            await self._send(Reply(521, "5.5.1", ("Protocol error: unexpected PROXY header",)))
            return
        arg_or_none = arg.strip() or None
        if self._no_service and verb != "QUIT":
            await self._send(Reply(503, "5.5.1", ("Error: no SMTP service here",)))
            return
        handler = self._commands.get(verb)
        if handler is None:
            if verb in _NON_SMTP or verb.endswith(":"):
                metrics.PROTOCOL_ERRORS.labels("non_smtp").inc()
                await self._send(Reply(521, "5.5.1", ("Protocol error",)))
                return
            metrics.PROTOCOL_ERRORS.labels("unknown_command").inc()
            known = verb in ("EXPN", "HELP", "ETRN", "TURN", "BDAT", "AUTH", "XCLIENT", "XFORWARD")
            await self._send(NOT_IMPLEMENTED if known else UNKNOWN)
            return
        await handler(arg_or_none)

    def _buffer_startswith(self, prefix: bytes) -> bool:
        return bytes(self._reader._buffer[: len(prefix)]) == prefix  # type: ignore[attr-defined]

    @property
    def _tls_active(self) -> bool:
        return self._tls_protocol is not None

    def _out_of_sync(self) -> bool:
        return self.cfg.smtp.forbid_unauth_pipelining and self._pending_input()

    # -- commands -----------------------------------------------------------------

    async def _hello(self, arg: str | None, verb: str) -> None:
        assert self.flow is not None
        name = commands.parse_helo(arg, verb)
        if isinstance(name, Reply):
            await self._send(name)
            return
        refusal = await self.flow.helo(name, esmtp=verb == "EHLO")
        if self._out_of_sync():
            metrics.PROTOCOL_ERRORS.labels("pipelining").inc()
            await self._send(SYNC)
            self._close()
            return
        if refusal is not None:
            await self._send(refusal)
            return
        if verb == "HELO":
            await self._send(Reply(250, None, (self.hostname,)))
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.cfg.limits.message_size}", "8BITMIME"]
        if self.cfg.smtp.smtputf8:
            lines.append("SMTPUTF8")
        if self.tls_context is not None and not self._tls_active:
            lines.append("STARTTLS")
        if self.listener.auth_passthrough and self._tls_active:
            lines.append("AUTH " + " ".join(m.upper() for m in self.cfg.auth.mechanisms))
        lines += ["ENHANCEDSTATUSCODES", "DSN"]
        await self._send(Reply(250, None, tuple(lines)))

    async def _helo(self, arg: str | None) -> None:
        await self._hello(arg, "HELO")

    async def _ehlo(self, arg: str | None) -> None:
        await self._hello(arg, "EHLO")

    async def _mail(self, arg: str | None) -> None:
        assert self.flow is not None and self.model is not None
        client = self.model.client
        if client.helo is None:
            await self._send(Reply(503, "5.5.1", ("Error: send HELO/EHLO first",)))
            return
        if self.model.transaction is not None:
            await self._send(Reply(503, "5.5.1", ("Error: nested MAIL command",)))
            return
        if self.listener.require_tls and not self._tls_active:
            await self._send(MUST_STARTTLS)
            return
        allowed = set(commands.MAIL_PARAMS)
        if not self.cfg.smtp.smtputf8:
            allowed.discard("SMTPUTF8")
        parsed = commands.parse_path(arg, "FROM", allowed=allowed, esmtp=client.esmtp)
        if isinstance(parsed, Reply):
            metrics.PROTOCOL_ERRORS.labels("syntax").inc()
            await self._send(parsed)
            return
        await self._send(await self.flow.mail(parsed.address, parsed.params, parsed.keywords))

    async def _rcpt(self, arg: str | None) -> None:
        assert self.flow is not None and self.model is not None
        txn = self.model.transaction
        if txn is None:
            await self._send(Reply(503, "5.5.1", ("Error: need MAIL command",)))
            return
        parsed = commands.parse_path(
            arg,
            "TO",
            allowed=commands.RCPT_PARAMS,
            esmtp=self.model.client.esmtp,
            utf8_declared=txn.smtputf8,
        )
        if isinstance(parsed, Reply):
            metrics.PROTOCOL_ERRORS.labels("syntax").inc()
            await self._send(parsed)
            return
        await self._send(await self.flow.rcpt(parsed.address, parsed.params))

    async def _data(self, arg: str | None) -> None:
        assert self.flow is not None and self.model is not None
        txn = self.model.transaction
        if self._out_of_sync():
            metrics.PROTOCOL_ERRORS.labels("pipelining").inc()
            await self._send(SYNC)
            self._close()
            return
        if arg is not None:
            await self._send(Reply(501, "5.5.4", ("Syntax: DATA",)))
            return
        if txn is None:
            await self._send(Reply(503, "5.5.1", ("Error: need RCPT command",)))
            return
        if not txn.accepted_recipients:
            await self._send(Reply(554, "5.5.1", ("Error: no valid recipients",)))
            return
        refusal = await self.flow.data()
        if refusal is not None:
            await self._send(refusal)
            return
        await self._send(Reply(354, None, ("End data with <CR><LF>.<CR><LF>",)))
        limits = self.cfg.limits
        try:
            result = await read_data(
                self._reader,
                max_size=limits.message_size,
                max_line=limits.text_line_length,
                bare_newline=self.cfg.smtp.bare_newline,
                timeout=lambda: (
                    limits.stress_data_timeout if self.runtime.stressed else limits.data_timeout
                ),
                min_rate=limits.min_data_rate,
                timer=lambda seconds: self._timer(seconds, limits.stress_data_timeout),
                spool=Spool(
                    limits.spool_size,
                    self.cfg.resolve_path(self.cfg.server.spool_dir)
                    if self.cfg.server.spool_dir
                    else None,
                    limits.header_size,
                ),
            )
        except DataTimeout as exc:
            metrics.PROTOCOL_ERRORS.labels("timeout").inc()
            await self.flow.rset(reason=exc.reason)
            await self._send(Reply(421, "4.4.2", (f"{self.hostname} {TIMEOUT}",)))
            return
        except asyncio.IncompleteReadError:
            await self.flow.rset(reason="disconnected in data")
            self._close()
            return
        if result.problem is not None:
            await self._send(await self.flow.refuse_content(result.problem.value))
            return
        self._message_task = asyncio.ensure_future(self.flow.message(result.message))
        end = await asyncio.shield(self._message_task)
        self._message_task = None
        await self._send(end.reply)

    async def _rset(self, arg: str | None) -> None:
        assert self.flow is not None
        if arg is not None:
            await self._send(Reply(501, "5.5.4", ("Syntax: RSET",)))
            return
        await self._send(await self.flow.rset())

    async def _noop(self, arg: str | None) -> None:
        await self._send(Reply(250, "2.0.0", ("Ok",)))

    async def _vrfy(self, arg: str | None) -> None:
        await self._send(Reply(502, "5.5.1", ("VRFY command is disabled",)))

    async def _quit(self, arg: str | None) -> None:
        self._quit_seen = True
        await self._send(Reply(221, "2.0.0", ("Bye",)))
        # The server closes first after 221 (RFC 5321 4.1.1.10), as Postfix does:
        # our FIN goes out now, not a loop turn later, so TIME_WAIT stays on our
        # side rather than on the client's ports.
        transport = self.transport
        if transport is not None and transport.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                transport.write_eof()
        self._close()

    async def _starttls(self, arg: str | None) -> None:
        assert self.model is not None and self.flow is not None
        if self.tls_context is None:
            await self._send(NOT_IMPLEMENTED)
            return
        if self._tls_active:
            await self._send(TLS_ACTIVE)
            return
        if arg is not None:
            await self._send(Reply(501, "5.5.4", ("Syntax: STARTTLS",)))
            return
        await self.flow.starttls()
        # aiosmtpd sends 220, upgrades, and once the handshake is done discards
        # any plaintext pipelined after the command (CVE-2011-0411,
        # CVE-2024-34083): such bytes were never encrypted, so they never count.
        # The handshake gets the idle timeout, like a command line (asyncio's own
        # limit is 60 s, whatever the configuration or the stress).
        limits = self.cfg.limits
        idle = limits.stress_idle_timeout if self.runtime.stressed else limits.idle_timeout
        try:
            async with self._timer(idle, limits.stress_idle_timeout):
                await self.smtp_STARTTLS("")
        except TimeoutError:
            metrics.STARTTLS.labels("failure").inc()
            log.info("sid=%s STARTTLS handshake timed out after %gs", self.model.id, idle)
            self._abort()
            return
        except TLSSetupException as exc:
            metrics.STARTTLS.labels("failure").inc()
            log.info(
                "sid=%s STARTTLS handshake failed: %s", self.model.id, exc.__cause__ or "closed"
            )
            self._close()
            return
        obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        if obj is not None:
            cipher = obj.cipher()
            self.model.client.tls = TLSInfo(
                obj.version() or "", cipher[0] if cipher else "", cipher[2] if cipher else None
            )
        self.flow.tls_started()

    async def _auth(self, arg: str | None) -> None:
        """AUTH passthrough: the upstream checks the password; we relay each line."""
        assert self.flow is not None and self.model is not None
        client = self.model.client
        if not self.listener.auth_passthrough:
            await self._send(NOT_IMPLEMENTED)
            return
        if not self._tls_active:
            await self._send(MUST_STARTTLS)
            return
        if client.helo is None:
            await self._send(Reply(503, "5.5.1", ("Error: send HELO/EHLO first",)))
            return
        if client.login is not None:
            await self._send(Reply(503, "5.5.1", ("Error: already authenticated",)))
            return
        if self.model.transaction is not None:
            await self._send(Reply(503, "5.5.1", ("Error: MAIL transaction in progress",)))
            return
        mechanism, _, initial = (arg or "").partition(" ")
        if not mechanism or not mechanism.isascii():  # RFC 4422 §3.1: ASCII names
            await self._send(Reply(501, "5.5.4", ("Syntax: AUTH mechanism",)))
            return
        mechanism, initial = mechanism.upper(), initial.strip()
        if mechanism not in {m.upper() for m in self.cfg.auth.mechanisms}:
            await self._send(Reply(504, "5.5.4", ("Unsupported authentication mechanism",)))
            return
        if initial and not _BASE64.match(initial):
            await self._send(Reply(501, "5.5.2", ("Invalid base64 data in initial response",)))
            return
        # An initial response (RFC 4954, "=" when empty) goes upstream as it came.
        await self._send(await self.flow.auth(mechanism, initial or None, self._auth_answer))

    async def _auth_answer(self, challenge: Reply) -> bytes | None:
        """Send one 334 challenge, read the client's answer line (never logged)."""
        if self.transport is None or self.transport.is_closing():
            return None
        self._writer.write(b"334 " + challenge.text.encode("ascii", "replace") + b"\r\n")
        await self._writer.drain()
        limits = self.cfg.limits
        idle = limits.stress_idle_timeout if self.runtime.stressed else limits.idle_timeout
        try:
            async with self._timer(idle, limits.stress_idle_timeout):
                try:
                    line = await self._reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    await self._skip_long_line()  # under the same deadline
                    return None
        except TimeoutError:
            metrics.PROTOCOL_ERRORS.labels("timeout").inc()
            self._writer.write(Reply(421, "4.4.2", (f"{self.hostname} {TIMEOUT}",)).render())
            self._close()
            return None
        except asyncio.IncompleteReadError:
            self._close()
            return None
        answer = line[:-2]
        if not line.endswith(b"\r\n") or len(line) > AUTH_LINE_MAX:
            return None
        # Only base64 or "*" (cancel) goes upstream: nothing that could read as a command.
        if answer != b"*" and not _BASE64.match(answer.decode("latin-1")):
            return None
        return answer

    # -- timeouts and stress --------------------------------------------------------

    def _timer(self, seconds: float, stressed: float) -> asyncio.Timeout:
        """The deadline of one read, kept so that `stress()` can bring it forward."""
        timer = asyncio.timeout(seconds)
        self._wait = (timer, asyncio.get_running_loop().time() + stressed)
        return timer

    def stress(self) -> None:
        """The server came under stress: a read already waiting gets the stress
        timeout too (counted from when it began), not just the next one."""
        if self._read_deadline and self._read_stress_deadline < self._read_deadline:
            self._arm(self._read_stress_deadline)
        if self._wait is None:
            return
        timer, deadline = self._wait
        with contextlib.suppress(RuntimeError):  # that read is over
            when = timer.when()
            if when is None or deadline < when:
                timer.reschedule(deadline)

    # -- shutdown --------------------------------------------------------------------

    def shutdown(self, *, force: bool) -> None:
        """Say 421 and close if idle between transactions (or at once with force)."""
        if self._closing:
            return
        idle = not self._busy and (self.model is None or self.model.transaction is None)
        if not (idle or force):
            return  # the command loop says 421 once the transaction is over
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(Reply(421, "4.3.2", (f"{self.hostname} {SHUTTING_DOWN}",)).render())
        self._close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
