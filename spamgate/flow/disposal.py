"""DISCARD and HOLD: the messages spamgate takes itself instead of relaying them.

The client is told 250 either way, so what happens to the message must be as sure
as a relay: DISCARD drops it (logged), HOLD hands it to the quarantine, and only
its 250 makes the client's 250. The service is the front end's to choose: the
proxy's keeps held mail in a Maildir (`[server] quarantine`); the milter's
(`MtaHold`) has the MTA put it in its own hold queue instead.
"""

from __future__ import annotations

import abc

from ..message import Outgoing
from ..model import Session, Transaction
from ..reply import Reply
from ..upstream.base import Upstream

DISCARDED = Reply(250, "2.0.0", ("Ok",))


class Disposal(abc.ABC):
    """Where DISCARD and HOLD go; errors are `UpstreamError`, as from a relay."""

    async def discard(self, session: Session, txn: Transaction) -> Reply:
        """The message is dropped; the client hears this."""
        return DISCARDED

    @abc.abstractmethod
    async def hold(self, session: Session, txn: Transaction, content: Outgoing) -> Reply:
        """Keep the message (as it would have been relayed) out of the mail flow."""


HELD = Reply(250, "2.0.0", ("Ok: held",))


class MtaHold(Disposal):
    """HOLD left to the MTA: a milter's Postfix puts the message in its own hold
    queue (SMFIR_QUARANTINE) when the front end says so; nothing is written here."""

    async def hold(self, session: Session, txn: Transaction, content: Outgoing) -> Reply:
        return HELD


class Quarantine(Disposal):
    """HOLD delivers to an upstream of its own (the quarantine Maildir)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def hold(self, session: Session, txn: Transaction, content: Outgoing) -> Reply:
        held = await self.upstream.open(session.client)
        await held.mail(txn.mail_from, (), txn.smtputf8)
        for r in txn.accepted_recipients:
            await held.rcpt(r.address, (), txn.smtputf8)
        return await held.data(content)
