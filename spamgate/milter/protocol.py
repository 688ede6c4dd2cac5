"""Wire constants of the milter protocol, version 6.

A packet is a 4-byte big-endian length, one command byte and the command's data;
the length counts the command byte and the data. The values below are Sendmail's
(libmilter/mfdef.h) as Postfix defines them again in src/milter/milter8.c, which
is the implementation spamgate talks to.
"""

from __future__ import annotations

import enum

VERSION = 6
"""The protocol version spamgate speaks (Postfix >= 2.6 offers 6 by default)."""

HEADER_SIZE = 4
"""Bytes of the length prefix."""

POSTFIX_BODY_CHUNK = 65535
"""Postfix's MILTER_CHUNK_SIZE: the largest SMFIC_BODY chunk it sends."""


class Command(bytes, enum.Enum):
    """SMFIC_*: what the MTA sends to the filter."""

    ABORT = b"A"  # abort the current transaction
    BODY = b"B"  # a body chunk
    CONNECT = b"C"  # connection information
    MACRO = b"D"  # macros for the event that follows
    END_OF_MESSAGE = b"E"  # SMFIC_BODYEOB
    HELO = b"H"
    HEADER = b"L"
    MAIL = b"M"
    END_OF_HEADERS = b"N"
    OPTION_NEGOTIATION = b"O"
    QUIT = b"Q"  # close the connection
    RCPT = b"R"
    DATA = b"T"
    UNKNOWN = b"U"  # an SMTP command the MTA does not know
    QUIT_NEW_CONNECTION = b"K"  # SMFIC_QUIT_NC: end this session, keep the socket


class Response(bytes, enum.Enum):
    """SMFIR_*: what the filter sends back (only the ones spamgate uses)."""

    ACCEPT = b"a"
    CONTINUE = b"c"
    DISCARD = b"d"
    REJECT = b"r"
    TEMPFAIL = b"t"
    REPLY_CODE = b"y"
    SKIP = b"s"
    PROGRESS = b"p"
    ADD_HEADER = b"h"
    INSERT_HEADER = b"i"
    CHANGE_HEADER = b"m"
    QUARANTINE = b"q"
    OPTION_NEGOTIATION = b"O"


class Action(enum.IntFlag):
    """SMFIF_*: the message changes a filter may ask for (negotiated)."""

    NONE = 0
    ADD_HEADERS = 0x01
    CHANGE_BODY = 0x02
    ADD_RECIPIENT = 0x04
    DELETE_RECIPIENT = 0x08
    CHANGE_HEADERS = 0x10
    QUARANTINE = 0x20
    CHANGE_FROM = 0x40
    ADD_RECIPIENT_PARAMS = 0x80
    SET_MACRO_LIST = 0x100  # SMFIF_SETSYMLIST: the filter names the macros it wants


class ProtocolFlag(enum.IntFlag):
    """SMFIP_*: events the filter does not want, replies it will not send, and options."""

    NONE = 0
    NO_CONNECT = 1 << 0
    NO_HELO = 1 << 1
    NO_MAIL = 1 << 2
    NO_RCPT = 1 << 3
    NO_BODY = 1 << 4
    NO_HEADERS = 1 << 5
    NO_END_OF_HEADERS = 1 << 6
    NO_REPLY_HEADER = 1 << 7  # SMFIP_NR_HDR (also SMFIP_NOHREPL)
    NO_UNKNOWN = 1 << 8
    NO_DATA = 1 << 9
    SKIP = 1 << 10  # the MTA understands SMFIR_SKIP
    REJECTED_RCPT = 1 << 11  # send RCPTs the MTA already rejected
    NO_REPLY_CONNECT = 1 << 12
    NO_REPLY_HELO = 1 << 13
    NO_REPLY_MAIL = 1 << 14
    NO_REPLY_RCPT = 1 << 15
    NO_REPLY_DATA = 1 << 16
    NO_REPLY_UNKNOWN = 1 << 17
    NO_REPLY_END_OF_HEADERS = 1 << 18
    NO_REPLY_BODY = 1 << 19
    HEADER_LEADING_SPACE = 1 << 20  # header values keep the space after the colon


# The event each SMFIP_NO* flag suppresses, and the event each SMFIP_NR_* flag
# makes reply-less (milter8.c: SMFIP_NOSEND_MASK, SMFIP_NOREPLY_MASK).
NO_EVENT: dict[Command, ProtocolFlag] = {
    Command.CONNECT: ProtocolFlag.NO_CONNECT,
    Command.HELO: ProtocolFlag.NO_HELO,
    Command.MAIL: ProtocolFlag.NO_MAIL,
    Command.RCPT: ProtocolFlag.NO_RCPT,
    Command.BODY: ProtocolFlag.NO_BODY,
    Command.HEADER: ProtocolFlag.NO_HEADERS,
    Command.END_OF_HEADERS: ProtocolFlag.NO_END_OF_HEADERS,
    Command.UNKNOWN: ProtocolFlag.NO_UNKNOWN,
    Command.DATA: ProtocolFlag.NO_DATA,
}
NO_REPLY: dict[Command, ProtocolFlag] = {
    Command.CONNECT: ProtocolFlag.NO_REPLY_CONNECT,
    Command.HELO: ProtocolFlag.NO_REPLY_HELO,
    Command.MAIL: ProtocolFlag.NO_REPLY_MAIL,
    Command.RCPT: ProtocolFlag.NO_REPLY_RCPT,
    Command.DATA: ProtocolFlag.NO_REPLY_DATA,
    Command.UNKNOWN: ProtocolFlag.NO_REPLY_UNKNOWN,
    Command.HEADER: ProtocolFlag.NO_REPLY_HEADER,
    Command.END_OF_HEADERS: ProtocolFlag.NO_REPLY_END_OF_HEADERS,
    Command.BODY: ProtocolFlag.NO_REPLY_BODY,
}


class MacroStage(enum.IntEnum):
    """SMFIM_*: the stages a filter can name macro lists for (negotiation only).

    Note the order: end of message (5) comes before end of headers (6).
    """

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4
    END_OF_MESSAGE = 5
    END_OF_HEADERS = 6


STAGE_COMMAND: dict[MacroStage, Command] = {
    MacroStage.CONNECT: Command.CONNECT,
    MacroStage.HELO: Command.HELO,
    MacroStage.MAIL: Command.MAIL,
    MacroStage.RCPT: Command.RCPT,
    MacroStage.DATA: Command.DATA,
    MacroStage.END_OF_MESSAGE: Command.END_OF_MESSAGE,
    MacroStage.END_OF_HEADERS: Command.END_OF_HEADERS,
}
"""The event whose SMFIC_MACRO packet carries each stage's macros."""


class Family(bytes, enum.Enum):
    """SMFIA_*: the client's address family in SMFIC_CONNECT."""

    UNKNOWN = b"U"
    UNIX = b"L"
    INET = b"4"
    INET6 = b"6"
