"""The header fields a message gains and loses on its way through spamgate.

Gains, in this order, on top of the message: Authentication-Results first, as RFC
8601 §5 asks (above what it reports on), then what rules prepended (PREPEND) at
connect and HELO, then the transaction's (including the X-Spam fields of the
score tag), then, for a client that used TLS through the proxy, a Received field
of ours saying so (XCLIENT cannot tell Postfix; a milter's Postfix knows). Loses:
any Authentication-Results field that arrived claiming our authserv-id (RFC 8601
§5), named by its name and its place
among the fields of that name, so a front end that cannot rewrite bytes (a milter)
can remove it too.
"""

from __future__ import annotations

import email.utils

from ..message import Header, Message
from ..model import Session
from ..pipeline.ledger import Ledger
from . import authresults

_NAME = authresults.NAME.lower().encode("ascii")


class HeaderBuilder:
    """Renders what one session's messages gain; `hostname` is our authserv-id."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def added(self, session: Session, ledger: Ledger) -> list[tuple[str, str]]:
        """The fields to add, top first, for the session's current transaction."""
        ar = authresults.build(self.hostname, session, session.transaction)
        headers = [(authresults.NAME, ar), *ledger.headers, *ledger.txn_headers]
        # Only the proxy: a milter's Postfix saw the TLS itself, and says so.
        trace = self.received(session) if session.frontend == "proxy" else None
        if trace is not None:
            headers.append(trace)
        return headers

    def forged(self, header: Header) -> bool:
        """An Authentication-Results field that arrived claiming our authserv-id."""
        return header.name.lower() == authresults.NAME.lower() and authresults.claims(
            header.unfolded(), self.hostname
        )

    def removed(self, message: Message) -> tuple[tuple[str, int], ...]:
        """The forged fields, as (name, occurrence): 1 for the first field of that
        name in the message, 2 for the second, ...

        A message whose header section never spells the field's name has none:
        that is seen without parsing the fields (which nothing else may need).
        """
        if _NAME not in message.header_bytes.lower():
            return ()
        headers = message.headers
        if not any(self.forged(h) for h in headers):
            return ()
        seen: dict[str, int] = {}
        out = []
        for header in headers:
            key = header.name.lower()
            seen[key] = seen.get(key, 0) + 1
            if self.forged(header):
                out.append((header.name, seen[key]))
        return tuple(out)

    def received(self, session: Session) -> tuple[str, str] | None:
        """Our Received line when the client used TLS, which XCLIENT cannot tell Postfix.

        Postfix's own Received line names the real client (XCLIENT), but from
        Postfix's point of view the hop was plaintext; this one records the
        protocol and cipher the client really used, in Postfix's wording.
        """
        c = session.client
        if c.tls is None:
            return None
        name = "unknown" if c.name.startswith("[") else c.name
        proto = c.proto + "S" + ("A" if c.login else "")
        bits = f"{c.tls.bits}/{c.tls.bits} bits" if c.tls.bits else "unknown bits"
        value = (
            f"from {c.helo or 'unknown'} ({name} [{c.address}])\r\n"
            f"\t(using {c.tls.version} with cipher {c.tls.cipher} ({bits}))\r\n"
            f"\tby {self.hostname} (spamgate) with {proto} id {session.id};\r\n"
            f"\t{email.utils.formatdate(localtime=True)}"
        )
        return ("Received", value)
