"""Option negotiation and macro lists: what spamgate asks of the MTA, as plain data."""

from __future__ import annotations

import pytest

from spamgate.milter.codec import OptionNegotiation, ProtocolViolation
from spamgate.milter.macros import SPAMGATE_MACROS, missing, postfix_lines
from spamgate.milter.negotiate import Needs, negotiate
from spamgate.milter.protocol import Action, Command, MacroStage, ProtocolFlag

POSTFIX_37 = OptionNegotiation(6, Action(0x1FF), ProtocolFlag(0x1FFFFF))


def test_default_needs_against_postfix() -> None:
    n = negotiate(POSTFIX_37, Needs())
    assert n.version == 6
    assert n.actions == (
        Action.ADD_HEADERS | Action.CHANGE_HEADERS | Action.QUARANTINE | Action.SET_MACRO_LIST
    )
    # every event but UNKNOWN, a reply to each, header values byte for byte
    assert n.protocol == ProtocolFlag.NO_UNKNOWN | ProtocolFlag.HEADER_LEADING_SPACE
    assert all(n.replies_to(c) for c in Command)
    assert not n.sends(Command.UNKNOWN) and n.sends(Command.BODY)
    assert n.leading_space and not n.skip
    assert n.macros == SPAMGATE_MACROS and n.own_macro_lists
    assert not n.refused_actions and not n.refused_protocol
    wire = n.reply().encode()
    assert wire[4:5] == b"O" and b"{client_addr}" in wire


def test_only_what_is_offered_is_asked_for() -> None:
    # Postfix with milter_protocol = 2,no_header_reply: no SETSYMLIST, only NR_HDR
    old = OptionNegotiation(6, Action(0x3F), ProtocolFlag(0xFF))
    n = negotiate(old, Needs(no_reply=frozenset({Command.HEADER, Command.CONNECT})))
    assert n.actions & ~Action(0x3F) == Action.NONE
    assert n.protocol & ~ProtocolFlag(0xFF) == ProtocolFlag.NONE
    assert n.macros == {} and not n.own_macro_lists  # main.cf's lists apply
    assert Action.SET_MACRO_LIST in n.refused_actions
    assert ProtocolFlag.NO_REPLY_CONNECT in n.refused_protocol
    assert n.replies_to(Command.CONNECT)  # not offered: the MTA still waits
    assert not n.replies_to(Command.HEADER)  # NR_HDR (bit 7) was offered
    assert (
        negotiate(OptionNegotiation(4, Action(0x1FF), ProtocolFlag(0x1FFFFF)), Needs()).version == 4
    )


def test_no_reply_and_skipped_events() -> None:
    needs = Needs(
        events=frozenset({Command.CONNECT, Command.MAIL, Command.RCPT}),
        no_reply=frozenset({Command.CONNECT}),
        skip=True,
    )
    n = negotiate(POSTFIX_37, needs)
    for command in (Command.HELO, Command.DATA, Command.HEADER, Command.BODY):
        assert not n.sends(command)
    assert not n.replies_to(Command.CONNECT) and n.replies_to(Command.MAIL)
    assert n.skip


def test_version_too_old_is_a_violation() -> None:
    result = negotiate(OptionNegotiation(1, Action(0xF), ProtocolFlag(0)), Needs())
    assert isinstance(result, ProtocolViolation)
    with pytest.raises(ValueError):
        Needs(events=frozenset({Command.QUIT}))


def test_postfix_lines_add_to_the_defaults() -> None:
    lines = postfix_lines()
    # Postfix's default lists already hold the HELO, MAIL, DATA and EOM names we
    # read; only the connect list lacks the client facts.
    assert lines == [
        "milter_connect_macros = j {daemon_name} {daemon_addr} v _ "
        "{client_addr} {client_port} {client_name} {client_ptr}"
    ]
    assert postfix_lines({MacroStage.RCPT: ("{rcpt_addr}", "{x}")}) == [
        "milter_rcpt_macros = i {rcpt_addr} {rcpt_host} {rcpt_mailer} {x}"
    ]


def test_missing_macros() -> None:
    full = {n: "x" for n in SPAMGATE_MACROS[MacroStage.CONNECT]}
    assert missing(MacroStage.CONNECT, full) == []
    assert missing(MacroStage.CONNECT, {"j": "mx"}) == [
        "{client_addr}",
        "{client_name}",
        "{client_port}",
        "{client_ptr}",
        "{daemon_name}",
    ]
    assert missing(MacroStage.MAIL, {}) == []  # {auth_authen} only after AUTH
    assert missing(MacroStage.END_OF_MESSAGE, {}) == ["i"]
