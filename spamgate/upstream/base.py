"""The upstream interface the core drives in lock-step with the client.

Every method returns the upstream's `Reply` when the upstream answered, and raises
`UpstreamError` when it could not (refused connection, timeout, reset, a reply that
makes no sense at that point). The core maps an error to `451 4.3.0` and never to a
250, which is what keeps the "no message lost" promise in one place.
"""

from __future__ import annotations

import abc

from ..message import Outgoing
from ..model import Client
from ..reply import Reply


class UpstreamError(Exception):
    """The upstream could not give a meaningful reply. `kind` is a metric label."""

    def __init__(self, kind: str, detail: str, reply: Reply | None = None) -> None:
        super().__init__(detail)
        self.kind = kind  # connect, timeout, disconnect, protocol, xclient, refused, tls, auth
        self.detail = detail
        # Set when the upstream refused the whole session with a reply worth relaying
        # (a 421 or a 5xx answer to XCLIENT about the real client).
        self.reply = reply


class UpstreamSession(abc.ABC):
    """One upstream SMTP session on behalf of one client session."""

    @abc.abstractmethod
    async def mail(self, sender: str, params: tuple[str, ...], smtputf8: bool) -> Reply: ...

    @abc.abstractmethod
    async def rcpt(self, recipient: str, params: tuple[str, ...], smtputf8: bool) -> Reply: ...

    @abc.abstractmethod
    async def data(self, content: Outgoing) -> Reply:
        """Send DATA, the content (canonical CRLF, not dot-stuffed) and the dot."""

    @abc.abstractmethod
    async def rset(self) -> None:
        """Abort the transaction; raises UpstreamError if the session is unusable."""

    @abc.abstractmethod
    async def close(self) -> None:
        """End the session (QUIT, or back to a pool); never raises."""

    @property
    @abc.abstractmethod
    def usable(self) -> bool: ...

    def auth_mechanisms(self) -> frozenset[str]:
        """SASL mechanisms the upstream offers (AUTH passthrough); none by default."""
        return frozenset()

    async def auth(self, line: bytes) -> Reply:
        """Send one line of an AUTH exchange (the command, or a client response)."""
        raise UpstreamError("auth", "this upstream does not take AUTH")


class Upstream(abc.ABC):
    """A factory of upstream sessions, shared by all client sessions."""

    name: str = "upstream"

    @abc.abstractmethod
    async def open(self, client: Client) -> UpstreamSession:
        """Connect and introduce the real client; raises UpstreamError."""

    async def probe(self) -> bool:
        """True if the upstream answers now (for /readyz)."""
        return True

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Close pooled connections at shutdown."""
