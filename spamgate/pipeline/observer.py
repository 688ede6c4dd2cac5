"""One hook for whatever wants to watch a session's decisions: `spamgate explain`
prints them, a recorder could keep them (replaying traffic against new rules).

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

    def verdict(
        self, stage: Stage, entry: Check | CoreEntry, verdict: Verdict, seconds: float
    ) -> None:
        """An entry (a check, or one of the core's) decided at `stage`; `seconds` it took."""

    def reply(self, event: str, reply: Reply | None) -> None:
        """The driver answered an event (connect, helo, mail, rcpt, data, message,
        rset); None: the front end's own positive reply (greeting, 250 to HELO, 354)."""

    def transaction_end(self, event: TransactionEnd) -> None:
        """A transaction ended (the same snapshot checks that learn are given)."""
