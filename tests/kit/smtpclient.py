"""A raw SMTP client for tests: exact bytes out, parsed replies in.

Tests of the wire (pipelining, bare line ends, over-long lines) need to send bytes
no well-behaved client library would send, from a chosen loopback source address.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass


@dataclass
class Reply:
    code: int
    lines: list[str]  # text after "NNN " / "NNN-"

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        first = self.lines[0].split(" ", 1)[0] if self.lines else ""
        parts = first.split(".")
        return first if len(parts) == 3 and all(p.isdigit() for p in parts) else None

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}"


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, port: int, host: str = "127.0.0.1", source: str | None = None, greet: bool = True
    ) -> tuple[RawClient, Reply | None]:
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source, 0) if source else None, limit=2**20
        )
        client = cls(reader, writer)
        banner = await client.reply() if greet else None
        return client, banner

    async def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, timeout: float = 10) -> Reply:
        lines: list[str] = []
        code = 0
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.reader.readline()
                if not raw:
                    raise ConnectionError(f"connection closed after {lines!r}")
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                code = int(line[:3])
                lines.append(line[4:])
                if line[3:4] != "-":
                    break
        return Reply(code, lines)

    async def cmd(self, line: str | bytes, timeout: float = 10) -> Reply:
        if isinstance(line, str):
            line = line.encode()
        await self.send(line + b"\r\n")
        return await self.reply(timeout)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str = "gate.test") -> Reply:
        """STARTTLS, and on 220 the handshake; the reply to STARTTLS is returned."""
        r = await self.cmd("STARTTLS")
        if r.code == 220:
            await self.writer.start_tls(context, server_hostname=server_hostname)
        return r

    @property
    def tls_version(self) -> str | None:
        obj = self.writer.get_extra_info("ssl_object")
        return obj.version() if obj is not None else None

    async def closed(self, timeout: float = 5) -> bool:
        """True when the server has closed the connection (EOF)."""
        try:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(65536)
                while data:
                    data = await self.reader.read(65536)
            return True
        except (TimeoutError, ConnectionError):
            return False

    async def mail(
        self, sender: str, recipients: list[str], body: bytes, helo: str = "client.example.test"
    ) -> list[Reply]:
        """A whole transaction, one command at a time; returns every reply."""
        out = [await self.cmd(f"EHLO {helo}"), await self.cmd(f"MAIL FROM:<{sender}>")]
        for rcpt in recipients:
            out.append(await self.cmd(f"RCPT TO:<{rcpt}>"))
        data = await self.cmd("DATA")
        out.append(data)
        if data.code == 354:
            await self.send(body + b".\r\n")
            out.append(await self.reply())
        return out

    async def quit_and_drain(self) -> list[int]:
        """QUIT, then every reply code until the server closes: a command smuggled
        inside a message would show up here as a reply of its own."""
        await self.send(b"QUIT\r\n")
        codes = []
        while True:
            try:
                codes.append((await self.reply(timeout=5)).code)
            except ConnectionError:
                return codes

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
