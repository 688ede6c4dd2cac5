"""Milter test kit: a recording handler, an MTA side written from the protocol text,
and a server started on loopback.

The MTA side (`mta_packet`, `MtaClient`) is written here again on purpose, from the
packet layouts in Postfix's milter8.c, and not with spamgate's codec: a test that
encoded with the codec under test would agree with it by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from spamgate.milter.codec import Continue, Decision, Header, Helo, Mail, Rcpt
from spamgate.milter.handler import Macros, MessageDecision, MilterHandler
from spamgate.milter.negotiate import Needs
from spamgate.milter.server import Limits, MilterServer, Peer


def mta_packet(command: bytes, data: bytes = b"") -> bytes:
    """One MTA-to-filter packet: length (command byte included), command, data."""
    return struct.pack("!I", len(data) + 1) + command + data


def cstrings(*parts: str | bytes) -> bytes:
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


def optneg(version: int = 6, actions: int = 0x1FF, protocol: int = 0x1FFFFF) -> bytes:
    """What Postfix 3.7 sends: every action and every protocol flag of version 6."""
    return mta_packet(b"O", struct.pack("!III", version, actions, protocol))


def connect(host: str = "client.example.test", addr: str = "127.0.0.9", port: int = 40000) -> bytes:
    return mta_packet(b"C", cstrings(host) + b"4" + struct.pack("!H", port) + cstrings(addr))


def macros(stage: bytes, **values: str) -> bytes:
    data = b"".join(cstrings(k if len(k) == 1 else "{" + k + "}", v) for k, v in values.items())
    return mta_packet(b"D", stage + data)


Script = Callable[[str, object], "Decision | MessageDecision | None"]


@dataclass
class RecordingHandler(MilterHandler):
    """Records every call as (method, argument, macros); answers from `script`
    (None from the script means Continue)."""

    peer: Peer
    script: Script | None = None
    delay: float = 0.0
    calls: list[tuple[str, object, dict[str, str]]] = field(default_factory=list)
    closed: bool = False
    close_reason: str = ""

    async def _answer(self, name: str, arg: object, macros: Macros) -> Decision:
        self.calls.append((name, arg, dict(macros)))
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.script(name, arg) if self.script else None
        return Continue() if answer is None else answer  # type: ignore[return-value]

    async def connect(self, event, macros: Macros) -> Decision:
        return await self._answer("connect", event, macros)

    async def helo(self, event: Helo, macros: Macros) -> Decision:
        return await self._answer("helo", event, macros)

    async def mail(self, event: Mail, macros: Macros) -> Decision:
        return await self._answer("mail", event, macros)

    async def rcpt(self, event: Rcpt, macros: Macros) -> Decision:
        return await self._answer("rcpt", event, macros)

    async def data(self, macros: Macros) -> Decision:
        return await self._answer("data", None, macros)

    async def header(self, event: Header, macros: Macros) -> Decision:
        return await self._answer("header", event, macros)

    async def end_of_headers(self, macros: Macros) -> Decision:
        return await self._answer("eoh", None, macros)

    async def body(self, chunk: bytes, macros: Macros) -> Decision:
        return await self._answer("body", chunk, macros)

    async def end_of_message(self, macros: Macros) -> MessageDecision:
        answer = await self._answer("eom", None, macros)
        return answer if isinstance(answer, MessageDecision) else MessageDecision(answer)

    async def abort(self) -> None:
        self.calls.append(("abort", None, {}))

    async def close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def args(self, name: str) -> list[object]:
        return [c[1] for c in self.calls if c[0] == name]

    def macros_at(self, name: str) -> list[dict[str, str]]:
        return [c[2] for c in self.calls if c[0] == name]

    def body_bytes(self) -> bytes:
        return b"".join(c[1] for c in self.calls if c[0] == "body")  # type: ignore[misc]


@dataclass
class Recorder:
    """The handler factory: one RecordingHandler per SMTP session, all kept."""

    script: Script | None = None
    delay: float = 0.0
    sessions: list[RecordingHandler] = field(default_factory=list)
    made: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, peer: Peer) -> RecordingHandler:
        handler = RecordingHandler(peer, self.script, self.delay)
        self.sessions.append(handler)
        self.made.set()
        return handler

    async def closed_sessions(self, count: int, timeout: float = 20.0) -> list[RecordingHandler]:
        """Wait until `count` sessions are closed; the closed ones, in order."""
        async with asyncio.timeout(timeout):
            while sum(s.closed for s in self.sessions) < count:
                await asyncio.sleep(0.02)
        return [s for s in self.sessions if s.closed]


@contextlib.asynccontextmanager
async def running_milter(
    recorder: Recorder,
    needs: Needs | None = None,
    limits: Limits | None = None,
    port: int = 0,
) -> AsyncIterator[MilterServer]:
    server = MilterServer(recorder, needs, limits)
    await server.listen_tcp("127.0.0.1", port)
    try:
        yield server
    finally:
        await server.close(grace=0.5)


class MtaClient:
    """The MTA side over a real socket: send packets, read the filter's answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> MtaClient:
        reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def send(self, *packets: bytes) -> None:
        self.writer.write(b"".join(packets))
        await self.writer.drain()

    async def response(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """One answer: (command byte, data)."""
        async with asyncio.timeout(timeout):
            (length,) = struct.unpack("!I", await self.reader.readexactly(4))
            packet = await self.reader.readexactly(length)
        return packet[:1], packet[1:]

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the filter has closed the connection."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(1) == b""
        except (TimeoutError, ConnectionError):
            return False

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
