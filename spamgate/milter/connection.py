"""One MTA connection as a state machine, without I/O.

`receive(bytes)` decodes the MTA's packets and returns what to do: bytes to send at
once (the negotiation reply), a `Step` for the handler, or the end of the connection.
`answer(step, decision)` checks the handler's decision against the event and the
negotiation, and returns the bytes to send. The server is a loop around these two.

The checks follow what Postfix accepts (milter8.c, milter8_event): DISCARD is not an
answer to CONNECT or HELO; SMFIR_SKIP only to a body chunk and only if negotiated;
message edits only before the final answer to the end of message, and only those
negotiated. A decision the MTA would refuse is a bug in spamgate, not in the MTA's
input: `answer` raises `BadDecision` and the server answers with its fallback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import codec
from .codec import (
    Abort,
    AddHeader,
    ChangeHeader,
    Connect,
    Continue,
    Decision,
    Decoder,
    DefineMacros,
    Discard,
    Edit,
    EndOfMessage,
    Event,
    Helo,
    InsertHeader,
    OptionNegotiation,
    ProtocolViolation,
    Quarantine,
    Quit,
    QuitNewConnection,
    Skip,
    Violation,
)
from .negotiate import Needs, Negotiated, negotiate
from .protocol import Action, Command

_COMMAND_OF: dict[type, Command] = {
    codec.Connect: Command.CONNECT,
    codec.Helo: Command.HELO,
    codec.Mail: Command.MAIL,
    codec.Rcpt: Command.RCPT,
    codec.Data: Command.DATA,
    codec.Unknown: Command.UNKNOWN,
    codec.Header: Command.HEADER,
    codec.EndOfHeaders: Command.END_OF_HEADERS,
    codec.Body: Command.BODY,
    codec.EndOfMessage: Command.END_OF_MESSAGE,
    codec.Abort: Command.ABORT,
    codec.Quit: Command.QUIT,
    codec.QuitNewConnection: Command.QUIT_NEW_CONNECTION,
}
_NO_ANSWER = (Abort, Quit, QuitNewConnection)
_EDIT_ACTION: dict[type, Action] = {
    AddHeader: Action.ADD_HEADERS,
    InsertHeader: Action.ADD_HEADERS,
    ChangeHeader: Action.CHANGE_HEADERS,
    Quarantine: Action.QUARANTINE,
}


class BadDecision(ValueError):
    """The handler answered something the MTA would refuse at this point."""


@dataclass(frozen=True, slots=True)
class Step:
    """An event for the handler, the macros sent with it, and whether the MTA waits
    for an answer (False for abort and quit, and for events negotiated reply-less)."""

    event: Event
    macros: Mapping[str, str]
    replies: bool


@dataclass(frozen=True, slots=True)
class Send:
    """Bytes to write now, with no handler involved."""

    data: bytes


@dataclass(frozen=True, slots=True)
class End:
    """The connection is over: after SMFIC_QUIT (`violation` None) or a violation."""

    violation: ProtocolViolation | None = None


Output = Step | Send | End


class MilterConnection:
    """The protocol state of one MTA connection."""

    def __init__(self, needs: Needs, max_packet: int = codec.DEFAULT_MAX_PACKET) -> None:
        self.needs = needs
        self.decoder = Decoder(max_packet)
        self.negotiated: Negotiated | None = None
        self.ended = False
        self._pending: dict[Command, Mapping[str, str]] = {}

    def receive(self, data: bytes) -> list[Output]:
        """What the MTA's bytes ask for, in order."""
        return self._handle(self.decoder.feed(data))

    def eof(self) -> list[Output]:
        """The MTA closed its side."""
        if self.ended:
            return []
        self.ended = True
        return [End(self.decoder.eof())]

    def _handle(self, events: list[Event | ProtocolViolation]) -> list[Output]:
        out: list[Output] = []
        for event in events:
            if self.ended:
                # Only bytes after SMFIC_QUIT come after the end: say so.
                if isinstance(event, ProtocolViolation) and out and out[-1] == End():
                    out[-1] = End(event)
                break
            result = self._one(event)
            if result is not None:
                out.append(result)
                if isinstance(result, End):
                    self.ended = True
        return out

    def _one(self, event: Event | ProtocolViolation) -> Output | None:
        if isinstance(event, ProtocolViolation):
            return End(event)
        if self.negotiated is None:
            if not isinstance(event, OptionNegotiation):
                detail = f"{type(event).__name__} before the negotiation"
                return End(ProtocolViolation(Violation.OUT_OF_ORDER, detail))
            outcome = negotiate(event, self.needs)
            if isinstance(outcome, ProtocolViolation):
                return End(outcome)
            self.negotiated = outcome
            return Send(outcome.reply().encode())
        if isinstance(event, OptionNegotiation):
            return End(ProtocolViolation(Violation.OUT_OF_ORDER, "second negotiation"))
        if isinstance(event, DefineMacros):
            self._pending[event.command] = event.macros
            return None
        if isinstance(event, Quit):
            return End()
        command = _COMMAND_OF[type(event)]
        macros = self._pending.pop(command, _EMPTY)
        if isinstance(event, QuitNewConnection):
            self._pending.clear()
        replies = not isinstance(event, _NO_ANSWER) and self.negotiated.replies_to(command)
        return Step(event, macros, replies)

    def answer(self, step: Step, decision: Decision, edits: tuple[Edit, ...] = ()) -> bytes:
        """The bytes that answer `step`; BadDecision if the MTA would refuse them."""
        negotiated = self.negotiated
        assert negotiated is not None, "no step is made before the negotiation"
        event = step.event
        if edits:
            if not isinstance(event, EndOfMessage):
                raise BadDecision(f"message edits answer only the end of message, not {event!r}")
            for edit in edits:
                if _EDIT_ACTION[type(edit)] not in negotiated.actions:
                    raise BadDecision(f"{type(edit).__name__} was not negotiated")
        if not step.replies:
            if edits or not isinstance(decision, Continue):
                raise BadDecision(f"{decision!r} to {event!r}, which takes no reply")
            return b""
        if isinstance(decision, Discard) and isinstance(event, Connect | Helo):
            raise BadDecision("DISCARD is not an answer to CONNECT or HELO")
        if isinstance(decision, Skip) and (
            not isinstance(event, codec.Body) or not negotiated.skip
        ):
            raise BadDecision("SKIP answers only a body chunk, and only if negotiated")
        if not edits:
            return decision.encode()
        space = negotiated.leading_space
        return b"".join(_spaced(e, space).encode() for e in edits) + decision.encode()


_EMPTY: Mapping[str, str] = {}


def _spaced(edit: Edit, leading_space: bool) -> Edit:
    """With SMFIP_HDR_LEADSPC the MTA writes `name:value` as given; keep the usual
    `name: value` unless the value brings its own leading white space. An empty
    ChangeHeader value deletes the field and stays empty."""
    if not leading_space or isinstance(edit, Quarantine) or not edit.value:
        return edit
    if edit.value[0] in " \t":
        return edit
    if isinstance(edit, AddHeader):
        return AddHeader(edit.name, " " + edit.value)
    return type(edit)(edit.index, edit.name, " " + edit.value)
