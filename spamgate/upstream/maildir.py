"""The embedded upstream: deliver into a local Maildir, through the same code path.

It lets a newcomer run `spamgate run` with no MTA and read each accepted message as
a file. Delivery follows the Maildir rules (write in tmp/, fsync, rename into new/),
so a 250 from it means the message is on disk, as a 250 from an MTA would.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import os
import socket
import time

from ..message import Outgoing
from ..model import Client
from ..reply import Reply
from .base import Upstream, UpstreamError, UpstreamSession

_counter = itertools.count()


class MaildirUpstream(Upstream):
    name = "maildir"

    def __init__(self, path: str, hostname: str) -> None:
        self.path = path
        self.hostname = hostname
        self._ready = False

    def _ensure(self) -> None:
        if not self._ready:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(self.path, sub), exist_ok=True)
            self._ready = True

    async def open(self, client: Client) -> MaildirSession:
        try:
            self._ensure()
        except OSError as exc:
            raise UpstreamError("connect", f"maildir {self.path}: {exc.strerror}") from None
        return MaildirSession(self, client)

    async def probe(self) -> bool:
        try:
            self._ensure()
        except OSError:
            return False
        return os.access(os.path.join(self.path, "new"), os.W_OK)


class MaildirSession(UpstreamSession):
    def __init__(self, owner: MaildirUpstream, client: Client) -> None:
        self.owner = owner
        self.client = client
        self.sender: str | None = None
        self.recipients: list[str] = []

    @property
    def usable(self) -> bool:
        return True

    async def mail(self, sender: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        self.sender, self.recipients = sender, []
        return Reply(250, "2.1.0", ("Ok",))

    async def rcpt(self, recipient: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        self.recipients.append(recipient)
        return Reply(250, "2.1.5", ("Ok",))

    async def data(self, content: Outgoing) -> Reply:
        if self.sender is None or not self.recipients:
            return Reply(554, "5.5.1", ("Error: no valid recipients",))
        queue_id = f"{time.time_ns():x}{next(_counter):04x}"
        trace = self._trace(queue_id)
        try:
            name = await asyncio.to_thread(self._deliver, queue_id, trace, content)
        except OSError as exc:
            raise UpstreamError("disconnect", f"maildir write failed: {exc.strerror}") from None
        self.sender, self.recipients = None, []
        return Reply(250, "2.0.0", (f"Ok: queued as {name}",))

    def _trace(self, queue_id: str) -> bytes:
        """Return-Path and Received, as the MTA would add them, naming the real client."""
        c = self.client
        helo = c.helo or "unknown"
        name = "unknown" if c.name.startswith("[") else c.name
        rcpt = self.recipients[0] if len(self.recipients) == 1 else None
        received = (
            f"Received: from {helo} ({name} [{c.address}])\r\n"
            f"\tby {self.owner.hostname} (spamgate maildir) with {c.proto} id {queue_id}"
            + (f"\r\n\tfor <{rcpt}>" if rcpt else "")
            + f"; {email.utils.formatdate(localtime=True)}\r\n"
        )
        return f"Return-Path: <{self.sender}>\r\n{received}".encode("utf-8", "surrogateescape")

    def _deliver(self, queue_id: str, trace: bytes, content: Outgoing) -> str:
        base = f"{int(time.time())}.{queue_id}.{socket.gethostname()}"
        tmp = os.path.join(self.owner.path, "tmp", base)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for block in itertools.chain((trace,), content.blocks()):
                view = memoryview(block)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.owner.path, "new", base))
        return base

    async def rset(self) -> None:
        self.sender, self.recipients = None, []

    async def close(self) -> None:
        self.sender, self.recipients = None, []
