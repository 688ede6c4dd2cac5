"""SMTP smuggling: every vector of tests/e2e/vectors.py, in both bare_newline modes.

Over real sockets, each vector must give the upstream exactly one message (or
none, when refused), and no command hidden in the content may ever reach the
upstream as a command; the client must get exactly one reply for its one message.
A property test then checks the DATA reader itself against an independent oracle
for arbitrary mixes of CR, LF and dots, split across reads at every size.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spamgate.smtp.dataread import DataProblem, read_data
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory
from .vectors import FAKE_ENDS, SMUGGLER, VICTIM, has_bare_line_end, normalized, smuggling_message

SENDER = "a@example.org"
NORMALIZE = '[smtp]\nbare_newline = "normalize"\n'


async def open_data(c: RawClient) -> None:
    assert (await c.cmd("EHLO c.test")).code == 250
    assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354


def assert_no_smuggled_commands(sink: Sink) -> None:
    assert [cmd for cmd in sink.commands if cmd.startswith("MAIL")] == [f"MAIL FROM:<{SENDER}>"]
    assert [cmd for cmd in sink.commands if cmd.startswith("RCPT")] == ["RCPT TO:<u@example.test>"]
    assert not any(SMUGGLER in cmd or VICTIM in cmd for cmd in sink.commands)


@pytest.mark.parametrize("name", FAKE_ENDS)
async def test_reject_mode(gate_factory: GateFactory, sink: Sink, name: str) -> None:
    gate = await gate_factory()
    wire, content = smuggling_message(FAKE_ENDS[name], name)
    c, _ = await gate.client()
    await open_data(c)
    await c.send(wire)
    r = await c.reply()
    if has_bare_line_end(content):
        assert (r.code, r.enhanced) == (550, "5.5.2")
        assert r.text in ("5.5.2 Error: bare <LF> received", "5.5.2 Error: bare <CR> received")
        assert sink.messages == []
        assert "DATA" not in sink.commands  # refused content never reaches the upstream
    else:  # the NUL vector: no bare line end, so it is one ordinary message
        assert r.code == 250
        assert [m.original for m in sink.messages] == [normalized(content)]
    assert await c.quit_and_drain() == [221]
    assert_no_smuggled_commands(sink)


@pytest.mark.parametrize("name", FAKE_ENDS)
async def test_normalize_mode(gate_factory: GateFactory, sink: Sink, name: str) -> None:
    gate = await gate_factory(NORMALIZE)
    wire, content = smuggling_message(FAKE_ENDS[name], name)
    c, _ = await gate.client()
    await open_data(c)
    await c.send(wire)
    r = await c.reply()
    assert r.code == 250
    assert await c.quit_and_drain() == [221]
    assert len(sink.messages) == 1
    relayed = sink.messages[0].original
    assert relayed == normalized(content)
    assert not has_bare_line_end(relayed)
    assert b"NO SMUGGLING" in relayed and SMUGGLER.encode() in relayed  # content, kept
    assert sink.commands.count("DATA") == 1
    assert_no_smuggled_commands(sink)


@pytest.mark.parametrize("mode", ["reject", "normalize"])
async def test_the_aiosmtpd_vector(gate_factory: GateFactory, sink: Sink, mode: str) -> None:
    """CVE-2024-27305, verbatim: one message that still contains 'NO SMUGGLING'."""
    gate = await gate_factory(NORMALIZE if mode == "normalize" else "")
    c, _ = await gate.client()
    await open_data(c)
    await c.send(b"Testing\n.\r\nNO SMUGGLING\r\n.\r\n")
    r = await c.reply()
    if mode == "reject":
        assert str(r) == "550 5.5.2 Error: bare <LF> received"
        assert sink.messages == []
    else:
        assert r.code == 250
        # "Testing" is no header field: it goes on after an empty line (as Postfix
        # delivers such content), the rest unchanged.
        assert [m.original for m in sink.messages] == [b"\r\nTesting\r\n.\r\nNO SMUGGLING\r\n"]
    assert await c.quit_and_drain() == [221]


@pytest.mark.parametrize("name", ["lf.crlf", "crlf.cr", "cr.crlf", "crlf.cr.crlf"])
async def test_vectors_split_across_segments(
    gate_factory: GateFactory, sink: Sink, name: str
) -> None:
    """The fake end cut between two TCP writes, at every byte around it."""
    gate = await gate_factory()
    wire, _ = smuggling_message(FAKE_ENDS[name], name)
    at = wire.index(FAKE_ENDS[name])
    for cut in range(at - 1, at + len(FAKE_ENDS[name]) + 2):
        c, _ = await gate.client()
        await open_data(c)
        await c.send(wire[:cut])
        await asyncio.sleep(0.01)
        await c.send(wire[cut:])
        r = await c.reply()
        assert (r.code, r.enhanced) == (550, "5.5.2"), f"cut at {cut}"
        assert await c.quit_and_drain() == [221]
    assert sink.messages == []
    assert not any(SMUGGLER in cmd or VICTIM in cmd for cmd in sink.commands)


async def test_commands_after_a_refused_message_are_read_in_step(
    gate_factory: GateFactory, sink: Sink
) -> None:
    """After the real end, the next bytes are commands again; inside, never."""
    gate = await gate_factory()
    wire, _ = smuggling_message(FAKE_ENDS["lf.lf"], "step")
    c, _ = await gate.client()
    await open_data(c)
    await c.send(wire + b"RSET\r\n")  # pipelined after the dot, as RFC 2920 allows
    assert (await c.reply()).code == 550
    r = await c.reply()
    assert str(r) == "250 2.0.0 Ok"  # RSET's reply, and nothing before it
    assert (await c.cmd("NOOP")).code == 250
    assert_no_smuggled_commands(sink)


# -- the DATA reader against an oracle ---------------------------------------------------

# Long filler too, so that the reader's buffer overflows between line ends and a
# piece can end on any byte, a lone CR included.
PIECES = [
    *(b"a", b"xxxxxxxx", b".", b"..", b"\r", b"\n", b"\r\n"),
    *(b"\r\n.", b".\r\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\r\n"),
]


def oracle(wire: bytes) -> tuple[bytes, bytes]:
    """(content as sent, bytes after the end): the end is the first CRLF.CRLF,
    counting the CRLF that ended the DATA command."""
    s = b"\r\n" + wire
    end = s.find(b"\r\n.\r\n")
    return s[2 : end + 2], s[end + 5 :]


async def read_all(wire: bytes, limit: int, chunks: list[int], mode: str):
    reader = asyncio.StreamReader(limit=limit)

    async def feed() -> None:
        pos = 0
        for size in chunks:
            reader.feed_data(wire[pos : pos + size])
            pos += size
            await asyncio.sleep(0)
        reader.feed_data(wire[pos:])
        reader.feed_eof()

    feeder = asyncio.ensure_future(feed())
    result = await read_data(reader, max_size=10**6, max_line=10**6, bare_newline=mode, timeout=5)
    rest = await reader.read()
    await feeder
    return result, rest


@settings(max_examples=300, deadline=None)
# A CR that ends one piece of the buffer and a dot line that starts the next.
@example(b"xxxxxxxx\r.\r\nyy", b"", 4, [], "reject")
@example(b"xxxxxxxx\ryy", b"", 4, [11], "reject")
@example(b"xxxxxxxx\r\n.\r", b"QUIT\r\n", 8, [9], "normalize")
@given(
    body=st.lists(st.sampled_from(PIECES), max_size=30).map(b"".join),
    after=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<x@evil.test>\r\n"]),
    limit=st.sampled_from([3, 4, 5, 8, 13, 64, 2**16]),
    # [] feeds it all at once: the reader then splits only where its buffer is full
    chunks=st.one_of(st.just([]), st.lists(st.integers(1, 9), max_size=12)),
    mode=st.sampled_from(["reject", "normalize"]),
)
def test_reader_finds_the_one_true_end(
    body: bytes, after: bytes, limit: int, chunks: list[int], mode: str
) -> None:
    wire = body + b"\r\n.\r\n" + after
    content, rest_expected = oracle(wire)
    result, rest = asyncio.run(read_all(wire, limit, chunks, mode))
    assert rest == rest_expected  # the stream is left exactly after the real end
    assert result.size == len(content)
    if mode == "reject" and has_bare_line_end(content):
        assert result.problem in (DataProblem.BARE_LF, DataProblem.BARE_CR)
        assert result.content == b""
    else:
        assert result.problem is None
        assert result.content == normalized(content)
