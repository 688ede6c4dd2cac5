"""One hook for whatever wants to watch a session's decisions: `spamgate explain`
prints them, the capture keeps them (`spamgate replay` runs them again against
new rules).

An observer is a subclass with the methods it needs; a method misspelt is then
simply not an override, and the base class's no-op documents what exists. Each is
called on the event loop, in the session's order, and must not block or change
what it is shown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model import Stage
from .verdict import Verdict

if TYPE_CHECKING:
    from ..reply import Reply
    from .check import Check, TransactionEnd
    from .entry import CoreEntry


class Observer:
    """No-op by default; override what you need."""

    def command(self, event: str, args: tuple[object, ...]) -> None:
        """The front end handed the driver an event, with its facts as given, before
        the driver acts on it: connect (), client_talked_first (action,), helo
        (name, esmtp), starttls (), tls_started (), auth (mechanism,), mail (sender,
        params, keywords), rcpt (recipient, params), data (), message (Message,),
        refuse_content (kind,), rset (reason,), close (reason,)."""

    def verdict(
        self, stage: Stage, entry: Check | CoreEntry, verdict: Verdict, seconds: float
    ) -> None:
        """An entry (a check, or one of the core's) decided at `stage`; `seconds` it took."""

    def reply(self, event: str, reply: Reply | None) -> None:
        """The driver answered an event (connect, helo, mail, rcpt, data, message,
        rset); None: the front end's own positive reply (greeting, 250 to HELO, 354)."""

    def transaction_end(self, event: TransactionEnd) -> None:
        """A transaction ended (the same snapshot checks that learn are given)."""


class Observers(Observer):
    """Several observers, told in turn (a front end's own and the capture's)."""

    __slots__ = ("observers",)

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def command(self, event: str, args: tuple[object, ...]) -> None:
        for o in self.observers:
            o.command(event, args)

    def verdict(
        self, stage: Stage, entry: Check | CoreEntry, verdict: Verdict, seconds: float
    ) -> None:
        for o in self.observers:
            o.verdict(stage, entry, verdict, seconds)

    def reply(self, event: str, reply: Reply | None) -> None:
        for o in self.observers:
            o.reply(event, reply)

    def transaction_end(self, event: TransactionEnd) -> None:
        for o in self.observers:
            o.transaction_end(event)
