"""The limits every session lives within, and the refusals of broken protocol.

`[limits] message_size` (a SIZE= declared at MAIL beyond it, or content that
grows beyond it), `[limits] recipients` (per message), content the front end
found malformed (bare LF or CR, over-long lines, an over-large header block), and
a client that talked before the greeting (`[smtp] pregreet_action`). They are
the core's decisions, mandatory: enforced in monitor mode too, since what they
guard is spamgate itself, not the admin's taste in mail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..model import Stage
from ..reply import Reply
from .entry import CoreEntry
from .verdict import Action, Verdict

if TYPE_CHECKING:
    from .check import CheckContext
    from .ledger import Ledger

PROTOCOL_ERRORS = "spamgate_protocol_errors_total"

SIZE_EXCEEDED = Reply(552, "5.3.4", ("Message size exceeds fixed limit",))
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", ("Error: too many recipients",))
# What the front end found wrong with the content, by kind (Postfix's wording).
CONTENT_REPLIES = {
    "message_too_big": Reply(552, "5.3.4", ("Error: message file too big",)),
    "line_too_long": Reply(500, "5.5.2", ("Error: message line too long",)),
    "header_too_big": Reply(552, "5.3.4", ("Error: message header size exceeds limit",)),
    "bare_newline": Reply(550, "5.5.2", ("Error: bare <LF> received",)),
    "bare_cr": Reply(550, "5.5.2", ("Error: bare <CR> received",)),
}
PREGREET_DROPPED = Reply(521, "5.5.1", ("Protocol error",))
PREGREET_REFUSED = Reply(550, "5.5.1", ("Protocol error: talked before greeting",))


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """What a limit or protocol refusal found, counted by kind."""

    kind: str

    def counted(self) -> Iterable[tuple[str, tuple[str]]]:
        yield PROTOCOL_ERRORS, (self.kind,)


class SizeLimit(CoreEntry):
    """MAIL with SIZE= beyond [limits] message_size: refused before it starts."""

    label = "limits"
    mandatory = True
    decisions = ((Stage.MAIL, Action.REJECT),)

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        txn = ctx.transaction
        if txn is None or txn.declared_size is None or txn.declared_size <= self.limit:
            return None
        return Verdict(Action.REJECT, SIZE_EXCEEDED, result=ProtocolError("message_too_big"))


class RecipientLimit(CoreEntry):
    """A RCPT beyond [limits] recipients accepted ones: 452, as RFC 5321 §4.5.3.1.10 asks."""

    label = "limits"
    mandatory = True
    decisions = ((Stage.RCPT, Action.DEFER),)

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        txn = ctx.transaction
        if txn is None or len(txn.accepted_recipients) < self.limit:
            return None
        return Verdict(
            Action.DEFER, TOO_MANY_RECIPIENTS, result=ProtocolError("too_many_recipients")
        )


class ContentRefusal(CoreEntry):
    """Content the front end could not take as it came (`kind`: see CONTENT_REPLIES)."""

    mandatory = True

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reply = CONTENT_REPLIES[kind]

    @property
    def label(self) -> str:  # type: ignore[override]
        return "limits" if self.kind == "message_too_big" else "protocol"

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        action = Action.REJECT if self.reply.code >= 500 else Action.DEFER
        return Verdict(action, self.reply, result=ProtocolError(self.kind))

    @classmethod
    def all_series(cls) -> Iterable[tuple[Stage, str, Action]]:
        for kind, reply in CONTENT_REPLIES.items():
            action = Action.REJECT if reply.code >= 500 else Action.DEFER
            yield Stage.EOD, cls(kind).label, action


class Pregreet(CoreEntry):
    """A client that talked before our greeting ([smtp] pregreet_action): "drop"
    says 521 and closes; "enforce" refuses every RCPT of the session (held, as
    postscreen's enforce, whatever delay_reject says); "ignore" decides nothing."""

    label = "protocol"
    mandatory = True
    always_held = True
    decisions = ((Stage.CONNECT, Action.REJECT), (Stage.CONNECT, Action.DISCONNECT))

    def __init__(self, action: Literal["ignore", "enforce", "drop"]) -> None:
        self.action = action

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        if self.action == "drop":
            return Verdict(Action.DISCONNECT, PREGREET_DROPPED, rule="pregreet")
        if self.action == "enforce" and ledger.held.refusal is None:
            return Verdict(Action.REJECT, PREGREET_REFUSED, rule="pregreet")
        return None
