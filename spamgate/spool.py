"""Where DATA goes while it arrives: memory for small messages, a file for large ones.

Most mail is small, and a file per message would cost system calls and disk
writes for nothing; a large message, though, should not sit in memory while it
is checked and relayed. So the content stays in memory up to `threshold` bytes
(`[limits] spool_size`); past that, everything so far and everything after goes
to a `SpoolFile` in `[server] spool_dir`, written from a worker thread in blocks.
Only the header block is kept in memory either way (checks and the relay read
it; it is bounded by `[limits] header_size`), so a spooled message costs about
one block of memory in this process, whatever its size.
"""

from __future__ import annotations

import asyncio

from .message import BLOCK_SIZE, Message, SpoolFile, scan_header

_UNLIMITED = 1 << 62


class Spool:
    """Collects one message's canonical content; `finish()` makes the `Message`."""

    def __init__(
        self,
        threshold: int = _UNLIMITED,
        directory: str | None = None,
        header_limit: int = _UNLIMITED,
    ) -> None:
        self.threshold = threshold
        self.directory = directory or None
        self.header_limit = header_limit
        self.size = 0
        self._parts: list[bytes] = []  # not yet written (all of it, until spooled)
        self._pending = 0
        self._file: SpoolFile | None = None
        # The header block so far, until the empty line that ends it is seen.
        self._head = bytearray()
        self._scan = 0  # where the scan of `_head` goes on (a line start)
        self._header: bytes | None = None

    @property
    def spooled(self) -> bool:
        return self._file is not None

    @property
    def header_too_big(self) -> bool:
        """The header block is, or has grown, longer than `header_limit`."""
        if self._header is not None:
            return len(self._header) > self.header_limit
        return len(self._head) > self.header_limit

    async def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        self._track_header(data)
        self._parts.append(data)
        self._pending += len(data)
        if self._file is None and self.size > self.threshold:
            self._file = SpoolFile(self.directory)
        if self._file is not None and self._pending >= BLOCK_SIZE:
            await self._flush()

    def _track_header(self, data: bytes) -> None:
        if self._header is not None or len(self._head) > self.header_limit:
            return
        self._head += data
        # Where Postfix ends it (message.scan_header): at the empty line, or at
        # the first line that is no header field; b"" when all of it is body.
        end, self._scan = scan_header(self._head, self._scan)
        if end is not None:
            self._header = bytes(self._head[:end])
            self._head = bytearray()

    async def _flush(self) -> None:
        assert self._file is not None
        parts, self._parts, self._pending = self._parts, [], 0
        await asyncio.to_thread(self._file.append, parts)

    async def finish(self) -> Message:
        """The message; the spool may not be written to afterwards."""
        if self._file is None:
            content = b"".join(self._parts)
            self._parts = []
            return Message(content)
        if self._parts:
            await self._flush()
        header = self._header if self._header is not None else bytes(self._head)
        self._head = bytearray()
        return Message.spooled(header, self._file)

    def discard(self) -> None:
        """Forget the content (the message is refused); removes the file."""
        self._parts, self._pending = [], 0
        self._head = bytearray()
        if self._file is not None:
            self._file.close()
