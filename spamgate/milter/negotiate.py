"""The option negotiation: ask the MTA only for what spamgate needs.

The MTA opens with SMFIC_OPTNEG: its protocol version, the actions (SMFIF_*) a
filter may take and the protocol flags (SMFIP_*) it understands. The filter answers
with the subset it wants. Postfix refuses the filter if it asks for an action it did
not offer, or for a higher version (milter8.c, milter8_connect); a protocol flag it
did not offer is never asked for here either.

What spamgate asks for (`Needs`, all of it configurable):

* every event of the SMTP session and of the message except SMFIC_UNKNOWN
  (SMFIP_NOUNKNOWN): Postfix answers unknown commands itself;
* a reply at every step by default. Postfix lets a filter skip replies
  (SMFIP_NR_*), but then it sends several events without reading, and over TCP its
  small writes wait for delayed ACKs (Nagle): 48 ms per session against 4.6 ms
  (bench/milter_noreply.py). A reply costs 5 bytes and carries the ACK.
  `Needs.no_reply` turns it off per event: spamgate does over unix sockets, where
  there is no Nagle (`MilterServer(unix_needs=...)`, ops/server.UNIX_NEEDS);
* SMFIP_HDR_LEADSPC, so header values arrive byte for byte (with the space after the
  colon) as DKIM must see them, and fields we add keep the spacing we give them;
* the actions spamgate takes: add and insert header fields, change (delete) them,
  quarantine; and SMFIF_SETSYMLIST to name the macros it wants (`macros.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .codec import NegotiationReply, OptionNegotiation, ProtocolViolation, Violation
from .macros import SPAMGATE_MACROS
from .protocol import NO_EVENT, NO_REPLY, VERSION, Action, Command, MacroStage, ProtocolFlag

ALL_EVENTS = frozenset(NO_EVENT)
SPAMGATE_EVENTS = ALL_EVENTS - {Command.UNKNOWN}
SPAMGATE_ACTIONS = Action.ADD_HEADERS | Action.CHANGE_HEADERS | Action.QUARANTINE
LOWEST_VERSION = 2
"""The first version with SMFIC_OPTNEG as spamgate reads it (Postfix 2.3)."""


@dataclass(frozen=True)
class Needs:
    """What a filter asks of the MTA."""

    events: frozenset[Command] = SPAMGATE_EVENTS
    no_reply: frozenset[Command] = frozenset()
    actions: Action = SPAMGATE_ACTIONS
    macros: Mapping[MacroStage, tuple[str, ...]] = field(default_factory=lambda: SPAMGATE_MACROS)
    leading_space: bool = True
    skip: bool = False  # may answer a body chunk with SMFIR_SKIP
    rejected_recipients: bool = False  # also see RCPTs the MTA refused

    def __post_init__(self) -> None:
        unknown = (self.events | self.no_reply) - ALL_EVENTS
        if unknown:
            raise ValueError(f"not negotiable events: {sorted(c.name for c in unknown)}")


@dataclass(frozen=True)
class Negotiated:
    """The outcome: what the MTA will send and what the filter may answer."""

    version: int
    actions: Action
    protocol: ProtocolFlag
    macros: Mapping[MacroStage, tuple[str, ...]]
    # What was wanted but not offered, for one warning in the log.
    refused_actions: Action = Action.NONE
    refused_protocol: ProtocolFlag = ProtocolFlag.NONE

    def replies_to(self, command: Command) -> bool:
        """Whether the MTA waits for an answer to this event."""
        flag = NO_REPLY.get(command)
        return flag is None or flag not in self.protocol

    def sends(self, command: Command) -> bool:
        flag = NO_EVENT.get(command)
        return flag is None or flag not in self.protocol

    @property
    def leading_space(self) -> bool:
        return ProtocolFlag.HEADER_LEADING_SPACE in self.protocol

    @property
    def skip(self) -> bool:
        """The filter may answer a body chunk with SMFIR_SKIP."""
        return ProtocolFlag.SKIP in self.protocol

    @property
    def own_macro_lists(self) -> bool:
        """The MTA takes our macro lists (else main.cf's `milter_*_macros` apply)."""
        return bool(self.macros)

    def reply(self) -> NegotiationReply:
        return NegotiationReply(self.version, self.actions, self.protocol, self.macros)


def negotiate(offer: OptionNegotiation, needs: Needs) -> Negotiated | ProtocolViolation:
    """Answer the MTA's offer with the part of it that `needs` asks for."""
    if offer.version < LOWEST_VERSION:
        return ProtocolViolation(Violation.MALFORMED, f"milter protocol version {offer.version}")
    version = min(offer.version, VERSION)
    wanted_protocol = ProtocolFlag.NONE
    for command, flag in NO_EVENT.items():
        if command not in needs.events:
            wanted_protocol |= flag
    for command in needs.no_reply:
        wanted_protocol |= NO_REPLY[command]
    if needs.leading_space:
        wanted_protocol |= ProtocolFlag.HEADER_LEADING_SPACE
    if needs.skip:
        wanted_protocol |= ProtocolFlag.SKIP
    if needs.rejected_recipients:
        wanted_protocol |= ProtocolFlag.REJECTED_RCPT
    wanted_actions = needs.actions
    macros = {stage: tuple(names) for stage, names in needs.macros.items() if names}
    if macros:
        wanted_actions |= Action.SET_MACRO_LIST
    actions = wanted_actions & offer.actions
    protocol = wanted_protocol & offer.protocol
    if Action.SET_MACRO_LIST not in actions:
        macros = {}
    return Negotiated(
        version=version,
        actions=actions,
        protocol=protocol,
        macros=macros,
        refused_actions=wanted_actions & ~offer.actions,
        refused_protocol=wanted_protocol & ~offer.protocol,
    )
