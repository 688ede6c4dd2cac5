"""The upstream session that goes in lock-step with one client session.

Opened when the first MAIL (or AUTH) needs it, kept for the session's later
transactions, dropped when the client changes who it says it is (a new HELO, STARTTLS)
or when it fails. A failure is never a positive reply: the command that met it is
answered `451 4.3.0` (`failed`), and the transaction it happened in is broken, so
its later commands are too.
"""

from __future__ import annotations

import logging

from ..model import Client
from ..reply import TEMP_UPSTREAM, Reply
from ..upstream.base import Upstream, UpstreamError, UpstreamSession


class UpstreamLink:
    __slots__ = ("broken", "client", "log", "session", "upstream")

    def __init__(self, upstream: Upstream, client: Client, log: logging.LoggerAdapter) -> None:
        self.upstream = upstream
        self.client = client
        self.log = log
        self.session: UpstreamSession | None = None
        self.broken = False  # the upstream was lost inside the current transaction

    async def open(self) -> UpstreamSession:
        """The upstream session, opened (with the client's facts) if there is none."""
        if self.session is None or not self.session.usable:
            self.session = await self.upstream.open(self.client)
        return self.session

    async def abort_transaction(self) -> None:
        """RSET upstream; a session that cannot even do that is dropped."""
        if self.session is None:
            return
        try:
            await self.session.rset()
        except UpstreamError as exc:
            self.log.warning("upstream RSET failed (%s); dropping upstream session", exc.detail)
            await self.drop()

    async def drop(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            await session.close()

    def failed(self, exc: UpstreamError, command: str) -> Reply:
        """What the client hears when the upstream failed at `command`."""
        self.log.warning("upstream %s failed: %s: %s", command, exc.kind, exc.detail)
        return TEMP_UPSTREAM
