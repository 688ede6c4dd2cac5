"""Delayed rejection: refusals decided early, given at the first RCPT.

Postfix's `smtpd_delay_reject` (our `[smtp] delay_reject`, on by default) holds a
client's, HELO's or sender's rejection until the RCPT command, so the log says who
was refused mail for whom, and clients that do not expect a refusal at connect or
MAIL behave. The runner holds such a refusal here when it is decided (logging and
counting it at that stage); every RCPT of the session, or of the transaction for a
MAIL-stage one, is then refused with it by `HeldRefusal`, the first entry at RCPT.

DISCARD and HOLD decided before the end of data wait here too: the transaction's
own, or the session's (connect, HELO) for every transaction.

A new HELO replaces what the previous HELO decided, never what connect decided,
as Postfix judges the last HELO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..model import Stage
from .entry import CoreEntry
from .verdict import Verdict

if TYPE_CHECKING:
    from .check import CheckContext
    from .ledger import Ledger

# Stages whose refusals may be held for the first RCPT.
EARLY = (Stage.CONNECT, Stage.HELO, Stage.MAIL)


class Held:
    """What one session holds: refusals for the first RCPT, disposals for the end."""

    __slots__ = (
        "_disposal_stage",
        "_held_stage",
        "disposal",
        "refusal",
        "txn_disposal",
        "txn_refusal",
    )

    def __init__(self) -> None:
        self.refusal: Verdict | None = None  # connect, HELO (or pregreet)
        self._held_stage: Stage | None = None
        self.txn_refusal: Verdict | None = None  # MAIL
        self.disposal: Verdict | None = None  # DISCARD or HOLD at connect or HELO
        self._disposal_stage: Stage | None = None
        self.txn_disposal: Verdict | None = None  # MAIL, RCPT, DATA, end of data

    @property
    def any(self) -> Verdict | None:
        """The refusal every RCPT gets now, if one is held."""
        return self.refusal or self.txn_refusal

    def hold(self, stage: Stage, verdict: Verdict) -> None:
        if stage is Stage.MAIL:
            self.txn_refusal = verdict
        elif self.refusal is None:
            self.refusal, self._held_stage = verdict, stage

    def dispose(self, stage: Stage, verdict: Verdict) -> None:
        if stage in (Stage.CONNECT, Stage.HELO):
            self.disposal, self._disposal_stage = verdict, stage
        else:
            self.txn_disposal = verdict

    def forget_helo(self) -> None:
        """A new HELO: what the previous HELO decided no longer holds."""
        if self._held_stage is Stage.HELO:
            self.refusal, self._held_stage = None, None
        if self._disposal_stage is Stage.HELO:
            self.disposal, self._disposal_stage = None, None

    def end_transaction(self) -> None:
        self.txn_refusal = self.txn_disposal = None

    @property
    def for_message(self) -> Verdict | None:
        """The DISCARD or HOLD the message gets, if any was decided before its end."""
        return self.txn_disposal or self.disposal


class HeldRefusal(CoreEntry):
    """At each RCPT, the refusal held since connect, HELO or MAIL, if any."""

    label = "delayed"
    records = False  # logged and counted when it was decided

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        return ledger.held.any
