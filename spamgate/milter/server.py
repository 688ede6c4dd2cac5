"""The asyncio milter server: one task per MTA connection around `MilterConnection`.

Every read has a deadline: `idle_timeout` while no packet is under way (Postfix may
wait a long time between events, e.g. while the client sends DATA to it) and
`packet_timeout` for the rest of a packet once it has begun. Every handler call has
a deadline too, below Postfix's own (`milter_command_timeout`, 30 s, for connect to
DATA; `milter_content_timeout`, 300 s, for header to end of message): past it the
call is cancelled and the MTA gets `Limits.fallback`, so a slow check never makes
Postfix apply `milter_default_action` to a session it could have answered.

A handler that raises, or answers something the MTA would refuse, gets the fallback
too, with the error logged. A protocol violation (malformed, oversized or unknown
packet, bytes after quit) is logged and the connection closed; nothing the MTA
sends reaches the event loop as an exception.

One connection carries many messages (SMFIC_ABORT between transactions) and, with
SMFIC_QUIT_NC, many SMTP sessions: each session gets a new handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .. import metrics
from . import codec
from .codec import Continue, Decision, TempFail
from .connection import BadDecision, End, MilterConnection, Send, Step
from .handler import Macros, MessageDecision, MilterHandler
from .macros import missing
from .negotiate import Needs
from .protocol import MacroStage

log = logging.getLogger("spamgate.milter")
T = TypeVar("T")

READ_SIZE = 1 << 18
_CONTENT = (codec.Header, codec.EndOfHeaders, codec.Body, codec.EndOfMessage)
_STAGE_OF = {
    codec.Connect: MacroStage.CONNECT,
    codec.Data: MacroStage.DATA,
    codec.EndOfMessage: MacroStage.END_OF_MESSAGE,
}


@dataclass(frozen=True)
class Limits:
    """Every limit of the milter server, in one place."""

    max_packet: int = codec.DEFAULT_MAX_PACKET
    idle_timeout: float = 900.0  # no packet under way
    packet_timeout: float = 30.0  # the rest of a packet that has begun
    command_deadline: float = 25.0  # a handler's answer, connect to DATA (Postfix: 30 s)
    content_deadline: float = 270.0  # header to end of message (Postfix: 300 s)
    write_timeout: float = 30.0
    fallback: Decision = field(default_factory=TempFail)  # deadline passed, handler failed

    @classmethod
    def for_postfix(cls, command_timeout: float, content_timeout: float) -> Limits:
        """Deadlines inside Postfix's milter_command_timeout and milter_content_timeout:
        each answer leaves a margin (5 s, or a sixth of the timeout if less), so that
        Postfix hears spamgate's fallback rather than timing out itself."""
        return cls(
            command_deadline=command_timeout - min(5.0, command_timeout / 6),
            content_deadline=content_timeout - min(5.0, content_timeout / 6),
        )


@dataclass(frozen=True)
class Peer:
    """Where the MTA connection comes from: (host, port) over TCP, a path for unix."""

    address: tuple[str, int] | str

    def __str__(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        host, port = self.address
        return f"[{host}]:{port}"


HandlerFactory = Callable[[Peer], MilterHandler]


class MilterServer:
    """Serve the milter protocol on TCP or unix sockets, one handler per SMTP session."""

    def __init__(
        self,
        factory: HandlerFactory,
        needs: Needs | None = None,
        limits: Limits | None = None,
        unix_needs: Needs | None = None,
    ) -> None:
        """`unix_needs`: what to ask of an MTA on a unix socket, if not `needs`
        (over a unix socket no reply can be held up by Nagle and delayed ACKs,
        so skipping replies costs no latency there, only saves round trips)."""
        self.factory = factory
        self.needs = needs or Needs()
        self.unix_needs = unix_needs or self.needs
        self.limits = limits or Limits()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._missing_reported: set[tuple[MacroStage, str]] = set()
        self.addresses: list[tuple[str, int] | str] = []

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        server = await asyncio.start_server(self._accept, host, port, limit=READ_SIZE)
        self._servers.append(server)
        address = server.sockets[0].getsockname()[:2]
        self.addresses.append(address)
        return address

    async def listen_unix(self, path: str, mode: int = 0o660, group: int = -1) -> str:
        """Listen on a unix socket at `path` (a stale one is replaced), with the
        file mode and group (-1: the process's) Postfix needs to connect."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.start_unix_server(self._accept, path, limit=READ_SIZE)
        os.chmod(path, mode)
        if group >= 0:
            os.chown(path, -1, group)
        self._servers.append(server)
        self.addresses.append(path)
        return path

    async def listen_socket(self, sock: socket.socket) -> tuple[str, int] | str:
        """Serve a socket bound and listening already (a worker's, from the supervisor)."""
        if sock.family == socket.AF_UNIX:
            server = await asyncio.start_unix_server(self._accept, sock=sock, limit=READ_SIZE)
            address: tuple[str, int] | str = sock.getsockname()
        else:
            server = await asyncio.start_server(self._accept, sock=sock, limit=READ_SIZE)
            address = tuple(sock.getsockname()[:2])  # type: ignore[assignment]
        self._servers.append(server)
        self.addresses.append(address)
        return address

    def stop_listening(self) -> None:
        """Accept no new connections; the open ones go on (see `close`)."""
        for server in self._servers:
            server.close()

    @property
    def connections(self) -> int:
        """MTA connections open now."""
        return len(self._tasks)

    async def close(self, grace: float = 1.0) -> None:
        """Stop accepting; give open connections `grace` seconds, then cancel them."""
        self.stop_listening()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.serve(reader, writer)
        except asyncio.CancelledError:
            # Closed at shutdown. Not raised on: asyncio's stream callback (3.11)
            # would log a cancelled connection task as an error.
            pass
        finally:
            self._tasks.discard(task)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One MTA connection, until quit, EOF, a violation or a deadline."""
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = writer.get_extra_info("peername")
        peer = Peer(tuple(peername[:2]) if isinstance(peername, tuple) else str(peername or ""))
        unix = sock is not None and sock.family == socket.AF_UNIX
        session = _Session(self, peer, writer, self.unix_needs if unix else self.needs)
        try:
            await session.run(reader)
        except TimeoutError:
            session.reason = "timeout"
            metrics.child(metrics.MILTER_ERRORS, "timeout").inc()
            log.info("milter connection %s: the MTA sent nothing in time; closing", peer)
        except ConnectionError as exc:
            session.reason = "connection lost"
            log.info("milter connection %s ended: %s", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:
            session.reason = "shutdown"
            raise
        except Exception:
            session.reason = "internal error"
            log.exception("milter connection %s: internal error, closing", peer)
        finally:
            await session.finish()
            session.watchdog.close()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _Watchdog:
    """The deadline of a connection's one wait at a time (a read, a handler call),
    with one timer rather than an `asyncio.timeout` per wait (a dozen and more a
    message: about 6% of the CPU a message cost). Arming stores a time; the timer is
    rescheduled only to move it earlier, and one that fires before the deadline
    (it was moved later) sets itself again. Past the deadline it cancels the
    connection's task; `bounded` turns that cancellation into TimeoutError."""

    __slots__ = ("deadline", "expired", "loop", "task", "timer", "when")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.deadline = 0.0  # 0: nothing is waited for
        self.timer: asyncio.TimerHandle | None = None
        self.when = 0.0
        self.expired = False

    def arm(self, seconds: float) -> None:
        self.deadline = self.loop.time() + seconds
        if self.timer is None or self.deadline < self.when:
            if self.timer is not None:
                self.timer.cancel()
            self.when = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._fire)

    def _fire(self) -> None:
        self.timer = None
        if not self.deadline:
            return
        if self.loop.time() < self.deadline:
            self.when = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._fire)
            return
        self.deadline = 0.0
        self.expired = True
        self.task.cancel()

    async def bounded(self, awaitable: Awaitable[T], seconds: float) -> T:
        """Await `awaitable`; TimeoutError if it takes more than `seconds`."""
        self.arm(seconds)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.expired:
                self.expired = False
                if self.task.uncancel() == 0:
                    raise TimeoutError from None
            raise
        finally:
            self.deadline = 0.0

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Session:
    """The loop of one connection: read, decode, call the handler, write."""

    def __init__(
        self, server: MilterServer, peer: Peer, writer: asyncio.StreamWriter, needs: Needs
    ) -> None:
        self.server = server
        self.limits = server.limits
        self.peer = peer
        self.writer = writer
        self.conn = MilterConnection(needs, self.limits.max_packet)
        self.handler: MilterHandler | None = None
        self.warned_refusals = False
        self.reason = "disconnected"  # how the connection ended, for the handler
        self.watchdog = _Watchdog()
        self.held: Decision | None = None  # for the next event the MTA waits on

    async def run(self, reader: asyncio.StreamReader) -> None:
        bounded = self.watchdog.bounded
        while True:
            timeout = (
                self.limits.packet_timeout
                if self.conn.decoder.pending
                else self.limits.idle_timeout
            )
            data = await bounded(reader.read(READ_SIZE), timeout)
            outputs = self.conn.receive(data) if data else self.conn.eof()
            for output in outputs:
                if isinstance(output, End):
                    if output.violation is not None:
                        self.reason = "protocol error"
                        metrics.child(metrics.MILTER_ERRORS, "violation").inc()
                        log.warning(
                            "milter connection %s: protocol violation, closing: %s",
                            self.peer,
                            output.violation,
                        )
                    elif data:
                        self.reason = "quit"
                        self._after_quit(reader)
                    return
                if isinstance(output, Send):
                    self.writer.write(output.data)
                    self._negotiated()
                else:
                    reply = await self._step(output)
                    if reply:
                        self.writer.write(reply)
            if self.writer.transport.get_write_buffer_size() > READ_SIZE:
                await bounded(self.writer.drain(), self.limits.write_timeout)

    def _after_quit(self, reader: asyncio.StreamReader) -> None:
        """Bytes the MTA sent after SMFIC_QUIT that are here already: a violation
        (any later ones are lost with the connection, which closes now)."""
        held = len(reader._buffer)  # type: ignore[attr-defined]
        if held:
            metrics.child(metrics.MILTER_ERRORS, "violation").inc()
            log.warning(
                "milter connection %s: protocol violation, closing: %s",
                self.peer,
                codec.ProtocolViolation(codec.Violation.AFTER_QUIT, f"{held} bytes"),
            )

    def _negotiated(self) -> None:
        negotiated = self.conn.negotiated
        if negotiated is None or self.warned_refusals:
            return
        self.warned_refusals = True
        if negotiated.refused_actions or negotiated.refused_protocol:
            log.warning(
                "milter connection %s: the MTA does not offer %s %s",
                self.peer,
                repr(negotiated.refused_actions),
                repr(negotiated.refused_protocol),
            )

    async def _step(self, step: Step) -> bytes:
        event = step.event
        if isinstance(event, codec.Abort):
            if self.handler is not None:
                await self._quietly(self.handler.abort())
            return b""
        if isinstance(event, codec.QuitNewConnection):
            self.reason = "quit"
            await self.finish()
            self.reason = "disconnected"
            return b""
        if self.handler is None:
            self.handler = self.server.factory(self.peer)
            assert self.conn.negotiated is not None
            self.handler.negotiated(self.conn.negotiated)
        stage = _STAGE_OF.get(type(event))
        if stage is not None:
            self._check_macros(stage, step.macros)
        content = isinstance(event, _CONTENT)
        deadline = self.limits.content_deadline if content else self.limits.command_deadline
        fallback = self.limits.fallback
        try:
            answer = await self.watchdog.bounded(self._call(self.handler, step), deadline)
        except TimeoutError:
            metrics.child(metrics.MILTER_ERRORS, "deadline").inc()
            log.warning(
                "milter connection %s: no decision on %s within %g s; answering %s",
                self.peer,
                type(event).__name__,
                deadline,
                type(fallback).__name__,
            )
            answer = fallback
        except Exception:
            metrics.child(metrics.MILTER_ERRORS, "failure").inc()
            log.exception("milter connection %s: handler failed on %r", self.peer, event)
            answer = fallback
        decision, edits = (
            (answer.decision, answer.edits) if isinstance(answer, MessageDecision) else (answer, ())
        )
        if not step.replies and not edits and not isinstance(decision, Continue):
            # The MTA is not waiting: the fallback (or a handler's refusal) is
            # given at the next event that takes an answer.
            self.held = self.held or decision
            return b""
        if step.replies and self.held is not None:
            decision, edits, self.held = self.held, (), None
        try:
            return self.conn.answer(step, decision, edits)
        except BadDecision as exc:
            log.error("milter connection %s: %s", self.peer, exc)
        if not step.replies:
            return b""
        try:
            return self.conn.answer(step, fallback)
        except BadDecision:  # e.g. a DISCARD fallback at CONNECT
            return self.conn.answer(step, TempFail())

    def _check_macros(self, stage: MacroStage, received: Macros) -> None:
        """Warn once per process and name when a macro Postfix always sends is absent:
        its lists are not the ones spamgate needs (see macros.py, docs/milter.md)."""
        reported = self.server._missing_reported
        absent = [n for n in missing(stage, received) if (stage, n) not in reported]
        if absent:
            reported.update((stage, n) for n in absent)
            log.warning(
                "milter: Postfix sent no %s at %s; its milter macro lists lack what "
                "spamgate reads (docs/milter.md)",
                " ".join(absent),
                stage.name.lower(),
            )

    @staticmethod
    async def _call(handler: MilterHandler, step: Step) -> Decision | MessageDecision:
        event, macros = step.event, step.macros
        match event:
            case codec.Connect():
                return await handler.connect(event, macros)
            case codec.Helo():
                return await handler.helo(event, macros)
            case codec.Mail():
                return await handler.mail(event, macros)
            case codec.Rcpt():
                return await handler.rcpt(event, macros)
            case codec.Data():
                return await handler.data(macros)
            case codec.Header():
                return await handler.header(event, macros)
            case codec.EndOfHeaders():
                return await handler.end_of_headers(macros)
            case codec.Body():
                return await handler.body(event.chunk, macros)
            case codec.EndOfMessage():
                if event.chunk:
                    decision = await handler.body(event.chunk, macros)
                    if not isinstance(decision, Continue):
                        return decision
                return await handler.end_of_message(macros)
            case codec.Unknown():
                return await handler.unknown(event, macros)
        raise AssertionError(f"no handler method for {event!r}")  # pragma: no cover

    async def _quietly(self, call) -> None:
        try:
            await self.watchdog.bounded(call, self.limits.command_deadline)
        except Exception:
            log.exception("milter connection %s: handler cleanup failed", self.peer)

    async def finish(self) -> None:
        """Close the current SMTP session's handler, if any (idempotent)."""
        self.held = None
        handler, self.handler = self.handler, None
        if handler is not None:
            await self._quietly(handler.close(self.reason))
