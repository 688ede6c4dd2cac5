"""The milter codec as plain data: packets in, events out; responses in, bytes out.

Packets are built with the test kit's own encoder (tests/kit/milterkit.py), written from
Postfix's milter8.c, so that the codec is checked against the protocol and not
against itself. The fuzzing at the end feeds arbitrary bytes, cut anywhere: the
decoder must return values, never raise.
"""

from __future__ import annotations

import ipaddress
import struct
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spamgate.milter import codec
from spamgate.milter.codec import (
    Abort,
    AddHeader,
    Body,
    ChangeHeader,
    Connect,
    Data,
    Decoder,
    DefineMacros,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    Mail,
    NegotiationReply,
    OptionNegotiation,
    ProtocolViolation,
    Quarantine,
    Quit,
    QuitNewConnection,
    Rcpt,
    ReplyCode,
    Unknown,
    Violation,
)
from spamgate.milter.protocol import Action, Command, Family, MacroStage, ProtocolFlag
from tests.kit.milterkit import connect, cstrings, macros, mta_packet, optneg


def decode_all(data: bytes, max_packet: int = codec.DEFAULT_MAX_PACKET) -> list[object]:
    return Decoder(max_packet).feed(data)


def one(data: bytes) -> object:
    events = decode_all(data)
    assert len(events) == 1, events
    return events[0]


# -- events ------------------------------------------------------------------------------


def test_option_negotiation_as_postfix_sends_it() -> None:
    event = one(optneg())
    assert event == OptionNegotiation(6, Action(0x1FF), ProtocolFlag(0x1FFFFF))
    assert Action.SET_MACRO_LIST in event.actions
    assert ProtocolFlag.HEADER_LEADING_SPACE in event.protocol


def test_macros_names_normalised_to_braces() -> None:
    raw = mta_packet(b"D", b"C" + cstrings("j", "mx.test", "client_addr", "1.2.3.4", "{x}", "y"))
    assert one(raw) == DefineMacros(
        Command.CONNECT, {"j": "mx.test", "{client_addr}": "1.2.3.4", "{x}": "y"}
    )
    assert one(mta_packet(b"D", b"T")) == DefineMacros(Command.DATA, {})


def test_connect_inet_inet6_unix_unknown() -> None:
    event = one(connect("mail.example.org", "192.0.2.7", 2525))
    assert event == Connect("mail.example.org", Family.INET, 2525, "192.0.2.7")
    assert event.ip == ipaddress.ip_address("192.0.2.7")
    v6 = mta_packet(
        b"C", cstrings("[2001:db8::1]") + b"6" + struct.pack("!H", 1) + cstrings("2001:db8::1")
    )
    assert one(v6).ip == ipaddress.ip_address("2001:db8::1")
    prefixed = mta_packet(b"C", cstrings("x") + b"6" + struct.pack("!H", 1) + cstrings("IPv6:::1"))
    assert one(prefixed).ip == ipaddress.ip_address("::1")
    local = mta_packet(
        b"C", cstrings("localhost") + b"L" + struct.pack("!H", 0) + cstrings("/run/x")
    )
    assert one(local) == Connect("localhost", Family.UNIX, 0, "/run/x")
    assert one(local).ip is None
    assert one(mta_packet(b"C", cstrings("stdin") + b"U")) == Connect("stdin", Family.UNKNOWN)
    # an address that is not one is kept as text, never raised on
    bad = mta_packet(b"C", cstrings("h") + b"4" + struct.pack("!H", 1) + cstrings("not-an-ip"))
    assert one(bad).ip is None


def test_envelope_events() -> None:
    assert one(mta_packet(b"H", cstrings("client.example"))) == Helo("client.example")
    mail = one(mta_packet(b"M", cstrings("<a@example.org>", "SIZE=100", "BODY=8BITMIME")))
    assert mail == Mail("<a@example.org>", ("SIZE=100", "BODY=8BITMIME"))
    assert mail.address == "a@example.org"
    assert one(mta_packet(b"M", cstrings("<>"))).address == ""
    rcpt = one(mta_packet(b"R", cstrings("<u@example.test>")))
    assert rcpt == Rcpt("<u@example.test>") and rcpt.address == "u@example.test"
    assert one(mta_packet(b"T")) == Data()
    assert one(mta_packet(b"U", cstrings("XYZZY now"))) == Unknown("XYZZY now")


def test_message_events_keep_bytes() -> None:
    value = "=?utf-8?q?caf=C3=A9?= caf\u00e9 \udcff\n\tfolded"  # UTF-8, then a stray byte
    raw = mta_packet(b"L", b"Subject\0" + value.encode("utf-8", "surrogateescape") + b"\0")
    header = one(raw)
    assert header == Header("Subject", value)
    # surrogateescape: the exact bytes come back, as DKIM needs them
    assert header.value.encode("utf-8", "surrogateescape").endswith(b"caf\xc3\xa9 \xff\n\tfolded")
    assert one(mta_packet(b"N")) == EndOfHeaders()
    chunk = bytes(range(256)) * 4
    assert one(mta_packet(b"B", chunk)) == Body(chunk)
    assert one(mta_packet(b"E")) == EndOfMessage()
    assert one(mta_packet(b"A")) == Abort()
    assert one(mta_packet(b"K")) == QuitNewConnection()
    assert one(mta_packet(b"Q")) == Quit()


def test_non_ascii_and_non_utf8_text_never_raises() -> None:
    raw = macros(b"C", client_name="h\xe9llo".encode("latin-1").decode("latin-1"))
    assert isinstance(one(raw), DefineMacros)
    raw = mta_packet(b"D", b"C{client_name}\0\xff\xfe\0")
    assert one(raw).macros["{client_name}"].encode("utf-8", "surrogateescape") == b"\xff\xfe"


def test_a_stream_cut_anywhere_decodes_the_same() -> None:
    stream = (
        optneg()
        + macros(b"C", j="mx.test", client_addr="127.0.0.9")
        + connect()
        + mta_packet(b"H", cstrings("c.example"))
        + mta_packet(b"M", cstrings("<a@b.example>"))
        + mta_packet(b"B", b"x" * 70000)
        + mta_packet(b"Q")
    )
    whole = decode_all(stream)
    assert len(whole) == 7 and whole[-1] == Quit()
    for cut in (1, 3, 4, 5, 1000, 65536):
        decoder = Decoder()
        pieces: list[object] = []
        for i in range(0, len(stream), cut):
            pieces += decoder.feed(stream[i : i + cut])
        assert pieces == whole, cut
        assert decoder.pending == 0


# -- violations: values, never exceptions --------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"\0\0\0\0", Violation.EMPTY_PACKET),
        (mta_packet(b"Z"), Violation.UNKNOWN_COMMAND),
        (mta_packet(b"O", b"\0\0\0\6"), Violation.MALFORMED),
        (mta_packet(b"D"), Violation.MALFORMED),
        (mta_packet(b"D", b"?x\0y\0"), Violation.MALFORMED),
        (mta_packet(b"D", b"Cname-only\0"), Violation.MALFORMED),
        (mta_packet(b"D", b"Cno-nul"), Violation.MALFORMED),
        (mta_packet(b"C", b"host\0Z"), Violation.MALFORMED),
        (mta_packet(b"C", b"host\0" + b"4"), Violation.MALFORMED),
        (mta_packet(b"C", b"host\0" + b"4\0\x19addr"), Violation.MALFORMED),
        (mta_packet(b"C", b"host"), Violation.MALFORMED),
        (mta_packet(b"C", b"host\0U-extra"), Violation.MALFORMED),
        (mta_packet(b"H", b"no terminator"), Violation.MALFORMED),
        (mta_packet(b"H", b"two\0strings\0"), Violation.MALFORMED),
        (mta_packet(b"M"), Violation.MALFORMED),
        (mta_packet(b"L", b"Subject\0"), Violation.MALFORMED),
        (mta_packet(b"L", b"Subject"), Violation.MALFORMED),
        (mta_packet(b"T", b"x"), Violation.MALFORMED),
        (mta_packet(b"Q", b"x"), Violation.MALFORMED),
    ],
)
def test_malformed_packets_are_violations(raw: bytes, kind: Violation) -> None:
    decoder = Decoder()
    events = decoder.feed(raw + optneg())
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation), events
    assert events[0].kind is kind
    assert decoder.closed and decoder.feed(optneg()) == []  # nothing after a violation


def test_huge_length_refused_before_any_data() -> None:
    decoder = Decoder(max_packet=codec.MIN_MAX_PACKET)
    (event,) = decoder.feed(struct.pack("!I", codec.MIN_MAX_PACKET + 1))
    assert event.kind is Violation.TOO_LARGE and "131073" in event.detail
    assert decoder.pending == 0  # nothing buffered for it
    assert Decoder().feed(b"\xff\xff\xff\xffB")[0].kind is Violation.TOO_LARGE
    # the largest allowed packet is fine
    ok = Decoder(codec.MIN_MAX_PACKET).feed(mta_packet(b"B", b"y" * (codec.MIN_MAX_PACKET - 1)))
    assert ok == [Body(b"y" * (codec.MIN_MAX_PACKET - 1))]
    with pytest.raises(ValueError):
        Decoder(max_packet=1000)


def test_bytes_after_quit() -> None:
    decoder = Decoder()
    events = decoder.feed(mta_packet(b"Q") + b"junk")
    assert events[0] == Quit()
    assert events[1].kind is Violation.AFTER_QUIT
    decoder = Decoder()
    assert decoder.feed(mta_packet(b"Q")) == [Quit()]
    (late,) = decoder.feed(mta_packet(b"A"))
    assert late.kind is Violation.AFTER_QUIT


def test_truncated_at_eof() -> None:
    decoder = Decoder()
    assert decoder.feed(mta_packet(b"H", cstrings("x"))[:-1]) == []
    violation = decoder.eof()
    assert violation is not None and violation.kind is Violation.TRUNCATED
    assert Decoder().eof() is None


@st.composite
def packet_streams(draw: st.DrawFn) -> bytes:
    """Mostly well-framed packets with arbitrary contents, some arbitrary bytes."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            command = draw(st.sampled_from(b"ABCDEHKLMNOQRTUZ\0y"))
            data = draw(st.binary(max_size=64))
            parts.append(mta_packet(bytes([command]), data))
        else:
            parts.append(draw(st.binary(max_size=16)))
    return b"".join(parts)


@settings(max_examples=600, deadline=None)
@given(stream=packet_streams(), cuts=st.lists(st.integers(1, 40), max_size=12))
def test_fuzz_decoder_never_raises(stream: bytes, cuts: list[int]) -> None:
    decoder = Decoder(codec.MIN_MAX_PACKET)
    events: list[object] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        events += decoder.feed(stream[pos : pos + size])
        pos += size
    end = decoder.eof()
    violations = [e for e in events if isinstance(e, ProtocolViolation)]
    assert len(violations) <= 1
    if violations:
        assert events[-1] is violations[0] and end is None

    # the same bytes in one piece give the same events (a violation's detail may
    # count the bytes of the piece it was found in)
    def kinds(evs: list[object]) -> list[object]:
        return [e.kind if isinstance(e, ProtocolViolation) else e for e in evs]

    assert kinds(Decoder(codec.MIN_MAX_PACKET).feed(stream)) == kinds(events)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzz_any_packet_body(data: bytes) -> None:
    for command in b"ABCDEHKLMNOQRTU":
        result = codec.decode_packet(bytes([command]) + data)
        assert isinstance(result, ProtocolViolation) or type(result) in typing.get_args(codec.Event)


# -- responses -----------------------------------------------------------------------------


def test_simple_responses() -> None:
    assert codec.Continue().encode() == b"\0\0\0\1c"
    assert codec.Accept().encode() == b"\0\0\0\1a"
    assert codec.Reject().encode() == b"\0\0\0\1r"
    assert codec.TempFail().encode() == b"\0\0\0\1t"
    assert codec.Discard().encode() == b"\0\0\0\1d"
    assert codec.Skip().encode() == b"\0\0\0\1s"
    assert codec.Progress().encode() == b"\0\0\0\1p"


def test_reply_code_multiline_with_percent() -> None:
    reply = ReplyCode(550, "5.7.1", ("Refused by rule spam-42", "100% sure, see https://x.test/"))
    raw = reply.encode()
    text = b"550-5.7.1 Refused by rule spam-42\r\n550 5.7.1 100%% sure, see https://x.test/\0"
    assert raw == struct.pack("!I", len(text) + 1) + b"y" + text
    assert (
        reply.text
        == "550-5.7.1 Refused by rule spam-42\r\n550 5.7.1 100% sure, see https://x.test/"
    )
    assert ReplyCode(451, "4.7.1", ("",)).encode()[5:] == b"451 4.7.1\0"
    assert ReplyCode(421, None, ("bye",)).encode()[5:] == b"421 bye\0"


@pytest.mark.parametrize(
    "args",
    [
        (250, "2.0.0", ("ok",)),
        (550, "4.7.1", ("class mismatch",)),
        (550, "5.7", ("short",)),
        (550, "5.7.1", ("a\r\n250 ok",)),
        (550, "5.7.1", ("nul\0",)),
        (550, "5.7.1", ()),
        (550, "5.7.1", ("x" * 600,)),
        (550, None, ("4 apples",)),
        (550, "5.7.1", ("l",) * 33),
    ],
)
def test_reply_code_refuses_what_postfix_would(args: tuple) -> None:
    with pytest.raises(ValueError):
        ReplyCode(*args)


def test_header_edits() -> None:
    raw = AddHeader("X-Spam-Score", "1.5").encode()
    assert raw[4:] == b"hX-Spam-Score\x001.5\0"
    raw = InsertHeader(0, "Authentication-Results", "mx; spf=pass\n\tsmtp.mailfrom=a").encode()
    assert raw[4:] == b"i\0\0\0\0Authentication-Results\0mx; spf=pass\n\tsmtp.mailfrom=a\0"
    raw = ChangeHeader(2, "Authentication-Results", "").encode()
    assert raw[4:] == b"m\0\0\0\2Authentication-Results\0\0"
    assert Quarantine("spam score 20").encode()[4:] == b"qspam score 20\0"
    for bad in (
        lambda: AddHeader("X Bad", "v"),
        lambda: AddHeader("X-Bad:", "v"),
        lambda: AddHeader("X-Inject", "v\r\nBcc: victim"),
        lambda: AddHeader("X-Inject", "v\nBcc: victim"),
        lambda: AddHeader("X-Trail", "v\n"),
        lambda: AddHeader("X-Nul", "v\0"),
        lambda: ChangeHeader(0, "X", "v"),
        lambda: InsertHeader(-1, "X", "v"),
        lambda: Quarantine(""),
        lambda: Quarantine("a\nb"),
    ):
        with pytest.raises(ValueError):
            bad()


def test_negotiation_reply_with_macro_lists() -> None:
    reply = NegotiationReply(
        6,
        Action.ADD_HEADERS | Action.SET_MACRO_LIST,
        ProtocolFlag.NO_UNKNOWN,
        {MacroStage.END_OF_MESSAGE: ("i",), MacroStage.CONNECT: ("j", "{client_addr}")},
    )
    data = reply.encode()[5:]
    assert data[:12] == struct.pack("!III", 6, 0x101, 0x100)
    # stages in numeric order, each: 4-byte stage, names separated by spaces, NUL
    assert data[12:] == struct.pack("!I", 0) + b"j {client_addr}\0" + struct.pack("!I", 5) + b"i\0"
    with pytest.raises(ValueError):
        NegotiationReply(6, Action.NONE, ProtocolFlag.NONE, {MacroStage.CONNECT: ("a b",)})
