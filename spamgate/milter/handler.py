"""The interface a milter application implements: one method per event, each a decision.

The server makes one handler per SMTP session (per MTA connection, and again after
each SMFIC_QUIT_NC), calls its methods in the order the MTA sends events, and
writes back what they return. A method's `macros` are the ones the MTA sent for that
event (see `macros.py` for which); values of earlier stages are not repeated, so a
handler keeps what it needs.

Every method is abstract on purpose: a misspelt override is then a TypeError when the
handler is made, not an event silently answered with "continue". Each call has a
deadline (`server.Limits`); a handler that raises or runs past it gets the server's
fallback answer, and the MTA never waits past its own milter timeouts.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

from .codec import Connect, Continue, Decision, Edit, Header, Helo, Mail, Rcpt, Unknown
from .negotiate import Negotiated

Macros = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class MessageDecision:
    """The answer at the end of a message: edits first (header changes, quarantine),
    then the final decision. Edits are dropped by the MTA when the decision refuses."""

    decision: Decision = Continue()
    edits: tuple[Edit, ...] = ()


class MilterHandler(abc.ABC):
    """One SMTP session as the MTA reports it."""

    @abc.abstractmethod
    async def connect(self, event: Connect, macros: Macros) -> Decision:
        """The client connected. A refusal here closes the SMTP session with the
        MTA's own words (Postfix: "554 5.7.1 ... not accepting connections"), not
        ours: refuse at RCPT instead (delayed rejection)."""

    @abc.abstractmethod
    async def helo(self, event: Helo, macros: Macros) -> Decision:
        """HELO or EHLO (may come again, e.g. after STARTTLS)."""

    @abc.abstractmethod
    async def mail(self, event: Mail, macros: Macros) -> Decision:
        """MAIL FROM: a transaction starts."""

    @abc.abstractmethod
    async def rcpt(self, event: Rcpt, macros: Macros) -> Decision:
        """One RCPT TO. A refusal refuses this recipient only."""

    @abc.abstractmethod
    async def data(self, macros: Macros) -> Decision:
        """DATA: the envelope is complete."""

    @abc.abstractmethod
    async def header(self, event: Header, macros: Macros) -> Decision:
        """One header field of the message (the MTA's own Received field is not shown)."""

    @abc.abstractmethod
    async def end_of_headers(self, macros: Macros) -> Decision:
        """The header is complete."""

    @abc.abstractmethod
    async def body(self, chunk: bytes, macros: Macros) -> Decision:
        """The next body piece (Postfix: at most 65,535 bytes, CRLF line ends)."""

    @abc.abstractmethod
    async def end_of_message(self, macros: Macros) -> MessageDecision:
        """The message is complete: the final decision, and the edits to make."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """The transaction is over without an end of message (RSET, a refusal, a lost
        client). Postfix also sends one after a finished message: be idempotent."""

    @abc.abstractmethod
    async def close(self, reason: str) -> None:
        """The SMTP session is over: `reason` says how ("quit"; "disconnected": the
        MTA closed without SMFIC_QUIT, as Postfix does after a connect-stage verdict;
        "protocol error", "timeout", "connection lost", "shutdown")."""

    def negotiated(self, negotiated: Negotiated) -> None:  # noqa: B027 - optional hook
        """Called once, before the first event: what the MTA agreed to. An event it
        sends without waiting for an answer (`negotiated.replies_to(command)` is
        False) must be answered with Continue; a refusal found there is the
        handler's to give at a later event that takes an answer."""

    async def unknown(self, event: Unknown, macros: Macros) -> Decision:
        """An SMTP command the MTA did not know (only if `Needs.events` asks for it)."""
        return Continue()
