"""An upstream that accepts everything and delivers nothing.

For a front end whose MTA already holds the mail (a milter's Postfix: it is both
the server the client talks to and the place accepted mail goes) and for
`spamgate explain`, which only shows what would happen. It says 250 to every
command and keeps the last message it was given, so it can be shown.
"""

from __future__ import annotations

from ..message import Outgoing
from ..model import Client
from ..reply import Reply
from .base import Upstream, UpstreamSession


class DryUpstream(Upstream, UpstreamSession):
    """Says 250 to everything and remembers only the last message."""

    name = "dry"

    def __init__(self, text: str = "Ok", *, keep: bool = True) -> None:
        self.text = text  # the reply text for the message
        self.keep = keep  # False: remember nothing (a milter's, shared by every session)
        self.delivered: Outgoing | None = None

    async def open(self, client: Client) -> UpstreamSession:
        return self

    async def mail(self, sender: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        return Reply(250, "2.1.0", ("Ok",))

    async def rcpt(self, recipient: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        return Reply(250, "2.1.5", ("Ok",))

    async def data(self, content: Outgoing) -> Reply:
        if self.keep:
            self.delivered = content
        return Reply(250, "2.0.0", (self.text,))

    async def rset(self) -> None:
        pass

    async def close(self) -> None:
        pass

    @property
    def usable(self) -> bool:
        return True
