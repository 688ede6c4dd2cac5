"""The milter codec, without I/O: MTA bytes to typed events, typed responses to bytes.

`Decoder` frames a byte stream incrementally (a packet may arrive in any number of
pieces, several packets in one) and refuses a packet longer than its configured
maximum as soon as the length prefix is read, before buffering any of it. Whatever
the bytes, `Decoder.feed` returns values: a malformed, oversized or unknown packet,
or bytes after SMFIC_QUIT, become one `ProtocolViolation` and the decoder stops.
Nothing the MTA sends can raise.

Text (host names, addresses, macro values, header fields) is decoded as UTF-8 with
``surrogateescape``, so no byte is lost or refused: ``s.encode("utf-8",
"surrogateescape")`` gives back the exact bytes, which DKIM needs for headers.

Responses are frozen dataclasses with an `encode()` method. They validate their
own arguments and raise ValueError on a value that Postfix would refuse or that
could break the framing (a CR or LF inside a reply line, a header name with a colon,
a NUL anywhere): those values come from spamgate, not from the MTA.

Packet layouts follow Postfix's MTA side (src/milter/milter8.c: milter8_event,
milter8_conn_event, milter8_header, milter8_body) and Sendmail's libmilter.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from .protocol import HEADER_SIZE, Action, Command, Family, MacroStage, ProtocolFlag, Response

DEFAULT_MAX_PACKET = 1 << 20
"""1 MiB. Postfix's largest packets are body chunks (65,535 bytes plus the command)
and header fields (up to its header_size_limit, 102,400 bytes by default)."""

MIN_MAX_PACKET = 1 << 17
"""128 KiB: below this a default Postfix could send a legitimate packet too large."""

_LENGTH = struct.Struct("!I")
_THREE = struct.Struct("!III")
_PORT = struct.Struct("!H")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _wire(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# -- events: what the MTA sends --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptionNegotiation:
    """SMFIC_OPTNEG: the MTA's protocol version, the actions and protocol flags it offers."""

    version: int
    actions: Action
    protocol: ProtocolFlag


@dataclass(frozen=True, slots=True)
class DefineMacros:
    """SMFIC_MACRO: macro values for the event `command` that follows.

    Names are normalised to Sendmail's spelling: one character bare (``i``), longer
    names in braces (``{client_addr}``), whichever way the MTA spelt them.
    """

    command: Command
    macros: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Connect:
    """SMFIC_CONNECT. `hostname` is Postfix's verified client name, or ``[address]``.

    `address` is the text the MTA sent (an IP address, or a socket path for a local
    client); `ip` parses it and is None when it is not an IP address.
    """

    hostname: str
    family: Family
    port: int = 0
    address: str = ""

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        if self.family not in (Family.INET, Family.INET6):
            return None
        text = self.address[5:] if self.address[:5].lower() == "ipv6:" else self.address
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class Helo:
    """SMFIC_HELO: the name the client gave in HELO or EHLO."""

    name: str


@dataclass(frozen=True, slots=True)
class Mail:
    """SMFIC_MAIL: the sender as the client wrote it (Postfix: in angle brackets),
    then its ESMTP parameters."""

    sender: str
    params: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return _unbracket(self.sender)


@dataclass(frozen=True, slots=True)
class Rcpt:
    """SMFIC_RCPT: one recipient (in angle brackets) and its ESMTP parameters."""

    recipient: str
    params: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return _unbracket(self.recipient)


@dataclass(frozen=True, slots=True)
class Data:
    """SMFIC_DATA: the client sent DATA; the envelope is complete."""


@dataclass(frozen=True, slots=True)
class Unknown:
    """SMFIC_UNKNOWN: an SMTP command the MTA did not recognise."""

    command: str


@dataclass(frozen=True, slots=True)
class Header:
    """SMFIC_HEADER: one header field. A folded value keeps its line breaks as ``\\n``
    followed by the continuation's whitespace. With SMFIP_HDR_LEADSPC the value keeps
    the space after the colon; without it the MTA has removed one space."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    """SMFIC_EOH: no more header fields."""


@dataclass(frozen=True, slots=True)
class Body:
    """SMFIC_BODY: the next piece of the body, CRLF line ends, dots not stuffed."""

    chunk: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """SMFIC_BODYEOB: the message is complete; answer with the final decision.

    Sendmail may carry a last body piece here; Postfix never does."""

    chunk: bytes = b""


@dataclass(frozen=True, slots=True)
class Abort:
    """SMFIC_ABORT: forget the current transaction; the connection goes on."""


@dataclass(frozen=True, slots=True)
class Quit:
    """SMFIC_QUIT: the MTA is done; nothing follows on this connection."""


@dataclass(frozen=True, slots=True)
class QuitNewConnection:
    """SMFIC_QUIT_NC: this SMTP session is over, the next one follows on this socket
    (with a new SMFIC_CONNECT and the options already negotiated)."""


class Violation(enum.Enum):
    """What was wrong with the MTA's bytes."""

    EMPTY_PACKET = "empty packet"  # a length of 0: not even a command byte
    TOO_LARGE = "packet too large"
    UNKNOWN_COMMAND = "unknown command"
    MALFORMED = "malformed packet"
    AFTER_QUIT = "data after quit"
    TRUNCATED = "connection closed inside a packet"
    OUT_OF_ORDER = "command out of order"


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The MTA broke the protocol; the connection cannot go on. `detail` is for logs."""

    kind: Violation
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value


Event = (
    OptionNegotiation
    | DefineMacros
    | Connect
    | Helo
    | Mail
    | Rcpt
    | Data
    | Unknown
    | Header
    | EndOfHeaders
    | Body
    | EndOfMessage
    | Abort
    | Quit
    | QuitNewConnection
)


def _unbracket(path: str) -> str:
    return path[1:-1] if len(path) >= 2 and path[0] == "<" and path[-1] == ">" else path


class _Malformed(Exception):
    """Internal: a packet's data does not fit its command. Never leaves this module."""


def _strings(data: bytes, count: int | None = None) -> list[str]:
    """NUL-terminated strings: exactly `count` of them, or at least one."""
    if not data or data[-1] != 0:
        raise _Malformed("missing NUL terminator")
    parts = data[:-1].split(b"\0")
    if count is not None and len(parts) != count:
        raise _Malformed(f"{len(parts)} strings where {count} belong")
    return [_text(p) for p in parts]


def _macro_name(name: str) -> str:
    if len(name) > 1 and not (name[0] == "{" and name[-1] == "}"):
        return "{" + name + "}"
    return name


_COMMANDS = {c.value[0]: c for c in Command}


def _decode_negotiation(data: bytes) -> OptionNegotiation:
    if len(data) < _THREE.size:
        raise _Malformed(f"{len(data)} bytes, 12 needed")
    version, actions, protocol = _THREE.unpack_from(data)
    # Unknown bits are kept: IntFlag accepts them, and negotiation masks them out.
    return OptionNegotiation(version, Action(actions), ProtocolFlag(protocol))


def _decode_macros(data: bytes) -> DefineMacros:
    if not data:
        raise _Malformed("no stage")
    command = _COMMANDS.get(data[0])
    if command is None:
        raise _Malformed(f"macros for unknown command {data[:1]!r}")
    macros: dict[str, str] = {}
    if len(data) > 1:
        parts = _strings(data[1:])
        if len(parts) % 2:
            raise _Malformed("macro name without a value")
        for i in range(0, len(parts), 2):
            macros[_macro_name(parts[i])] = parts[i + 1]
    return DefineMacros(command, macros)


def _decode_connect(data: bytes) -> Connect:
    end = data.find(b"\0")
    if end < 0 or end + 1 >= len(data):
        raise _Malformed("no host name or family")
    hostname = _text(data[:end])
    try:
        family = Family(data[end + 1 : end + 2])
    except ValueError:
        raise _Malformed(f"unknown address family {data[end + 1 : end + 2]!r}") from None
    rest = data[end + 2 :]
    if family is Family.UNKNOWN:
        if rest:
            raise _Malformed("data after an unknown address family")
        return Connect(hostname, family)
    if len(rest) < _PORT.size + 1:
        raise _Malformed("no port or address")
    (port,) = _PORT.unpack_from(rest)
    (address,) = _strings(rest[_PORT.size :], 1)
    return Connect(hostname, family, port, address)


def _decode_path(data: bytes) -> tuple[str, tuple[str, ...]]:
    parts = _strings(data)
    return parts[0], tuple(parts[1:])


def _empty(event: object):
    def decode(data: bytes) -> object:
        if data:
            raise _Malformed(f"{len(data)} unexpected bytes")
        return event

    return decode


_DECODERS = {
    Command.OPTION_NEGOTIATION: _decode_negotiation,
    Command.MACRO: _decode_macros,
    Command.CONNECT: _decode_connect,
    Command.HELO: lambda d: Helo(*_strings(d, 1)),
    Command.MAIL: lambda d: Mail(*_decode_path(d)),
    Command.RCPT: lambda d: Rcpt(*_decode_path(d)),
    Command.DATA: _empty(Data()),
    Command.UNKNOWN: lambda d: Unknown(*_strings(d, 1)),
    Command.HEADER: lambda d: Header(*_strings(d, 2)),
    Command.END_OF_HEADERS: _empty(EndOfHeaders()),
    Command.BODY: Body,
    Command.END_OF_MESSAGE: EndOfMessage,
    Command.ABORT: _empty(Abort()),
    Command.QUIT: _empty(Quit()),
    Command.QUIT_NEW_CONNECTION: _empty(QuitNewConnection()),
}
_BY_BYTE = {c.value[0]: f for c, f in _DECODERS.items()}


def decode_packet(packet: bytes) -> Event | ProtocolViolation:
    """One whole packet (command byte and data, without the length prefix)."""
    if not packet:
        return ProtocolViolation(Violation.EMPTY_PACKET)
    decode = _BY_BYTE.get(packet[0])
    if decode is None:
        return ProtocolViolation(Violation.UNKNOWN_COMMAND, repr(packet[:1]))
    try:
        return decode(packet[1:])
    except _Malformed as exc:
        return ProtocolViolation(Violation.MALFORMED, f"{packet[:1].decode('latin-1')}: {exc}")


class Decoder:
    """Incremental framing: feed it bytes as they arrive, get whole events back."""

    __slots__ = ("_buffer", "_closed", "_quit", "max_packet")

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        if max_packet < MIN_MAX_PACKET:
            raise ValueError(f"max_packet {max_packet} is below {MIN_MAX_PACKET}")
        self.max_packet = max_packet
        self._buffer = bytearray()
        self._closed = False  # after a violation: nothing more is decoded
        self._quit = False  # after SMFIC_QUIT: any further byte is a violation

    @property
    def pending(self) -> int:
        """Bytes of an incomplete packet held, waiting for the rest."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        return self._closed

    def feed(self, data: bytes) -> list[Event | ProtocolViolation]:
        """The events completed by `data`; the last may be a `ProtocolViolation`,
        after which the decoder is closed and returns nothing more."""
        if self._closed or not data:
            return []
        if self._quit:
            return [self._fail(ProtocolViolation(Violation.AFTER_QUIT, f"{len(data)} bytes"))]
        buf = self._buffer
        if buf:
            buf += data
            with memoryview(buf) as view:
                events, pos = self._frames(view)
            del buf[:pos]
        else:
            events, pos = self._frames(data)
            if pos < len(data) and not self._closed:
                buf += data[pos:]
        return events

    def _frames(self, view: bytes | memoryview) -> tuple[list[Event | ProtocolViolation], int]:
        """Decode the whole packets at the start of `view`; how far they reach."""
        events: list[Event | ProtocolViolation] = []
        pos, end = 0, len(view)
        while end - pos >= HEADER_SIZE:
            (length,) = _LENGTH.unpack_from(view, pos)
            if length == 0:
                events.append(self._fail(ProtocolViolation(Violation.EMPTY_PACKET)))
                return events, pos
            if length > self.max_packet:
                detail = f"{length} bytes, at most {self.max_packet}"
                events.append(self._fail(ProtocolViolation(Violation.TOO_LARGE, detail)))
                return events, pos
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            event = decode_packet(bytes(view[pos + HEADER_SIZE : stop]))
            pos = stop
            if isinstance(event, ProtocolViolation):
                events.append(self._fail(event))
                return events, pos
            events.append(event)
            if isinstance(event, Quit):
                self._quit = True
                if pos < end:
                    detail = f"{end - pos} bytes"
                    events.append(self._fail(ProtocolViolation(Violation.AFTER_QUIT, detail)))
                return events, pos
        return events, pos

    def eof(self) -> ProtocolViolation | None:
        """The peer closed: a violation if a packet was cut short, else None."""
        if self._closed or not self._buffer:
            return None
        held = len(self._buffer)
        return self._fail(ProtocolViolation(Violation.TRUNCATED, f"{held} bytes held"))

    def _fail(self, violation: ProtocolViolation) -> ProtocolViolation:
        self._closed = True
        self._buffer = bytearray()
        return violation


# -- responses: what the filter sends ----------------------------------------------------


def _packet(code: Response, data: bytes = b"") -> bytes:
    return _LENGTH.pack(len(data) + 1) + code.value + data


@dataclass(frozen=True, slots=True)
class Continue:
    """SMFIR_CONTINUE: no objection; go on to the next event."""

    def encode(self) -> bytes:
        return _CONTINUE


@dataclass(frozen=True, slots=True)
class Accept:
    """SMFIR_ACCEPT: accept the message (at connect or HELO: the whole connection)
    and send no more events for it."""

    def encode(self) -> bytes:
        return _ACCEPT


@dataclass(frozen=True, slots=True)
class Reject:
    """SMFIR_REJECT: Postfix answers ``550 5.7.1 Command rejected``."""

    def encode(self) -> bytes:
        return _REJECT


@dataclass(frozen=True, slots=True)
class TempFail:
    """SMFIR_TEMPFAIL: Postfix answers ``451 4.7.1 Service unavailable - try again later``."""

    def encode(self) -> bytes:
        return _TEMPFAIL


@dataclass(frozen=True, slots=True)
class Discard:
    """SMFIR_DISCARD: accept the message and throw it away (not at connect or HELO)."""

    def encode(self) -> bytes:
        return _DISCARD


@dataclass(frozen=True, slots=True)
class Skip:
    """SMFIR_SKIP: send no more body chunks of this message (needs SMFIP_SKIP)."""

    def encode(self) -> bytes:
        return _SKIP


@dataclass(frozen=True, slots=True)
class Progress:
    """SMFIR_PROGRESS: still working; the MTA waits for the real reply."""

    def encode(self) -> bytes:
        return _PROGRESS


_CONTINUE = _packet(Response.CONTINUE)
_ACCEPT = _packet(Response.ACCEPT)
_REJECT = _packet(Response.REJECT)
_TEMPFAIL = _packet(Response.TEMPFAIL)
_DISCARD = _packet(Response.DISCARD)
_SKIP = _packet(Response.SKIP)
_PROGRESS = _packet(Response.PROGRESS)

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}\Z")
_LINE_UNSAFE = re.compile(r"[\x00\r\n]")
REPLY_LINE_MAX = 510
"""RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets with its CRLF."""
REPLY_LINES_MAX = 32
"""libmilter's smfi_setmlreply takes at most 32 lines."""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """SMFIR_REPLYCODE: refuse with our own SMTP reply, the SMTP client sees it as is.

    `code` is 4xx or 5xx; `enhanced` (RFC 3463) must be of the same class; each of
    `lines` becomes one reply line. On the wire every line carries the code and the
    enhanced code, lines are joined with CRLF and the last has none, which is what
    Postfix (milter8.c, milter8_valid_smtp_reply) and Sendmail accept. A ``%`` is
    doubled: Sendmail uses the text as a format string and Postfix undoubles it.
    """

    code: int
    enhanced: str | None
    lines: tuple[str, ...] = ("",)

    def __post_init__(self) -> None:
        if not 400 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} is not 4xx or 5xx")
        if self.enhanced is not None and (
            not _ENHANCED.match(self.enhanced) or self.enhanced[0] != str(self.code)[0]
        ):
            raise ValueError(f"enhanced code {self.enhanced!r} does not fit {self.code}")
        if not self.lines or len(self.lines) > REPLY_LINES_MAX:
            raise ValueError(f"{len(self.lines)} reply lines (1 to {REPLY_LINES_MAX})")
        for line in self.lines:
            if _LINE_UNSAFE.search(line):
                raise ValueError(f"CR, LF or NUL in reply text {line!r}")
            if self.enhanced is None and line[:1].isdigit():
                # "550 4 ..." would be read as an enhanced code of the wrong class
                raise ValueError(f"reply text starts with a digit: {line!r}")
            if len(self._line(line, final=True)) > REPLY_LINE_MAX:
                raise ValueError(f"reply line longer than {REPLY_LINE_MAX} octets")

    def _line(self, text: str, final: bool) -> bytes:
        body = " ".join(x for x in (self.enhanced, text.replace("%", "%%")) if x)
        return _wire(f"{self.code}{' ' if final else '-'}{body}")

    def encode(self) -> bytes:
        last = len(self.lines) - 1
        text = b"\r\n".join(self._line(t, i == last) for i, t in enumerate(self.lines))
        return _packet(Response.REPLY_CODE, text + b"\0")

    @property
    def text(self) -> str:
        """The reply as the SMTP client will see it, CRLF between lines."""
        return self.encode()[5:-1].decode("utf-8", "surrogateescape").replace("%%", "%")


_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")
_FOLD = re.compile(r"\n(?![ \t])")


def _check_field(name: str, value: str) -> None:
    """A header field spamgate adds or changes: nothing in it may end it early or
    start another field (no NUL or CR; a LF only to fold, followed by space or tab)."""
    if not _FIELD_NAME.match(name):
        raise ValueError(f"bad header field name {name!r}")
    if "\0" in value or "\r" in value or _FOLD.search(value) or value.endswith("\n"):
        raise ValueError(f"header value of {name} would not stay one field: {value!r}")


@dataclass(frozen=True, slots=True)
class AddHeader:
    """SMFIR_ADDHEADER: append a header field at the end of the header (needs ADD_HEADERS)."""

    name: str
    value: str

    def __post_init__(self) -> None:
        _check_field(self.name, self.value)

    def encode(self) -> bytes:
        data = _wire(self.name) + b"\0" + _wire(self.value) + b"\0"
        return _packet(Response.ADD_HEADER, data)


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """SMFIR_INSHEADER: insert a header field at position `index` (0: the very top;
    Postfix counts its own Received field here, see docs/milter.md). Needs ADD_HEADERS."""

    index: int
    name: str
    value: str

    def __post_init__(self) -> None:
        if not 0 <= self.index < 1 << 31:
            raise ValueError(f"insert index {self.index}")
        _check_field(self.name, self.value)

    def encode(self) -> bytes:
        data = _LENGTH.pack(self.index) + _wire(self.name) + b"\0" + _wire(self.value) + b"\0"
        return _packet(Response.INSERT_HEADER, data)


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """SMFIR_CHGHEADER: replace the `index`-th (1-based) field called `name`; an empty
    `value` deletes it. Needs CHANGE_HEADERS."""

    index: int
    name: str
    value: str

    def __post_init__(self) -> None:
        if not 1 <= self.index < 1 << 31:
            raise ValueError(f"change index {self.index} (the first field is 1)")
        _check_field(self.name, self.value)

    def encode(self) -> bytes:
        data = _LENGTH.pack(self.index) + _wire(self.name) + b"\0" + _wire(self.value) + b"\0"
        return _packet(Response.CHANGE_HEADER, data)


@dataclass(frozen=True, slots=True)
class Quarantine:
    """SMFIR_QUARANTINE: put the message on hold (Postfix: the hold queue). Needs
    QUARANTINE. Postfix 3.7 ignores the reason; later releases log its first 100 bytes."""

    reason: str

    def __post_init__(self) -> None:
        if not self.reason or _LINE_UNSAFE.search(self.reason):
            raise ValueError(f"quarantine reason {self.reason!r}")

    def encode(self) -> bytes:
        return _packet(Response.QUARANTINE, _wire(self.reason) + b"\0")


@dataclass(frozen=True, slots=True)
class NegotiationReply:
    """The filter's SMFIC_OPTNEG answer: what it takes of the MTA's offer, and the
    macro list it wants at each stage (needs SET_MACRO_LIST)."""

    version: int
    actions: Action
    protocol: ProtocolFlag
    macros: Mapping[MacroStage, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for names in self.macros.values():
            for name in names:
                if not name or not name.isprintable() or " " in name:
                    raise ValueError(f"bad macro name {name!r}")

    def encode(self) -> bytes:
        data = _THREE.pack(self.version, int(self.actions), int(self.protocol))
        for stage in sorted(self.macros):
            data += _LENGTH.pack(stage) + _wire(" ".join(self.macros[stage])) + b"\0"
        return _packet(Response.OPTION_NEGOTIATION, data)


Decision = Continue | Accept | Reject | TempFail | Discard | ReplyCode | Skip
"""The final answer to one event."""

Edit = AddHeader | InsertHeader | ChangeHeader | Quarantine
"""A change to the message, sent before the final answer to SMFIC_BODYEOB."""
