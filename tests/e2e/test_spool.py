"""Large messages on disk, not in memory: the spool, reading a spooled message back,
and streaming it to the upstream dot-stuffed block by block, over real sockets."""

from __future__ import annotations

import asyncio
import itertools
import os
import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from spamgate.message import BLOCK_SIZE, Message
from spamgate.smtp.dataread import read_data
from spamgate.spool import Spool
from spamgate.upstream.smtp import dot_stuff
from tests.kit.sink import Sink

from ..conftest import GateFactory

LINES = [b"", b".", b"..", b".x", b"x.", b"Subject: s", b" folded", b"From: a@b.test", b"x" * 70]


def stuff(content: bytes) -> bytes:
    """Whole-message dot-stuffing (content is canonical: every LF follows a CR)."""
    return re.sub(rb"(?m)^\.", b"..", content)


@settings(max_examples=200, deadline=None)
@example(content=b".a\r\n", cuts=[1])
@example(content=b"a\r\n.b\r\n", cuts=[2, 3])
@given(
    content=st.lists(st.sampled_from(LINES), max_size=40).map(
        lambda lines: b"".join(x + b"\r\n" for x in lines)
    ),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_stuffing_block_by_block_is_stuffing_the_whole(content: bytes, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if c <= len(content)} | {0, len(content)})
    blocks = [content[a:b] for a, b in itertools.pairwise(points)]
    out, last = b"", b"\r\n"
    for block in blocks:
        if block:
            out += dot_stuff(block, last)
            last = (last + block[-2:])[-2:]
    assert out == stuff(content)


async def read_spooled(wire: bytes, threshold: int, directory: str) -> Message:
    reader = asyncio.StreamReader(limit=64)
    reader.feed_data(wire)
    reader.feed_eof()
    spool = Spool(threshold, directory)
    result = await read_data(
        reader, max_size=10**6, max_line=10**6, bare_newline="reject", timeout=5, spool=spool
    )
    assert result.message is not None
    return result.message


@settings(max_examples=100, deadline=None)
@given(
    content=st.lists(st.sampled_from(LINES), max_size=60).map(
        lambda lines: b"".join(x + b"\r\n" for x in lines)
    ),
    threshold=st.sampled_from([0, 10, 100, 10**9]),
)
def test_a_spooled_message_reads_back_as_received(tmp_path_factory, content, threshold) -> None:
    directory = str(tmp_path_factory.mktemp("spool"))
    msg = asyncio.run(read_spooled(stuff(content) + b".\r\n", threshold, directory))
    whole = Message(content)
    assert (msg.path is not None) == (len(content) > threshold)
    assert msg.size == len(content)
    assert msg.content == content
    assert msg.header_bytes == whole.header_bytes
    assert msg.headers == whole.headers
    assert msg.head(7) == content[:7]
    assert b"".join(msg.body_blocks()) == whole.body
    drop = lambda h: h.name == "Subject"  # noqa: E731
    out = msg.relayed(b"X-A: 1\r\n", drop)
    assert out.to_bytes() == whole.relayed(b"X-A: 1\r\n", drop).to_bytes()
    assert out.size == len(out.to_bytes())
    msg.close()
    assert os.listdir(directory) == []


def test_header_fields_are_removed_with_their_continuation_lines() -> None:
    msg = Message(
        b"A: 1\r\nAuthentication-Results: x;\r\n\tspf=pass\r\nB: 2\r\n"
        b"authentication-results: y; none\r\n\r\nbody\r\nA: 3\r\n"
    )
    out = msg.relayed(b"", lambda h: h.name.lower() == "authentication-results")
    assert out.removed == 2
    assert out.to_bytes() == b"A: 1\r\nB: 2\r\n\r\nbody\r\nA: 3\r\n"


def big_body() -> bytes:
    """About 600 KB whose dot lines fall on the relay's block boundaries: a line
    starting with a dot at the start of a block, and a CRLF split by one."""
    line = b"y" * 98 + b"\r\n"
    body = b"Subject: big\r\n\r\n"
    out = bytearray(body)
    while len(out) < 2 * BLOCK_SIZE + 4096:
        out += line
    # in the relayed stream, blocks after our header fields start at body offsets
    # multiple of BLOCK_SIZE (past the header block): put dots exactly there.
    start = len(body)
    out[start + BLOCK_SIZE - 2 : start + BLOCK_SIZE + 3] = b"\r\n.z."
    out[start + 2 * BLOCK_SIZE - 1 : start + 2 * BLOCK_SIZE + 2] = b"\r\n."
    return bytes(out)


async def send(gate, body: bytes, chunk: int = 65536):
    c, _ = await gate.client(source="127.0.0.1")
    assert (await c.cmd("EHLO client.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.test>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    wire = stuff(body) + b".\r\n"
    for i in range(0, len(wire), chunk):
        await c.send(wire[i : i + chunk])
    return c


async def test_a_large_message_is_held_on_disk_and_relayed_exactly(
    gate_factory: GateFactory, sink: Sink, tmp_path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    gate = await gate_factory("[limits]\nspool_size = 4096\n", server={"spool_dir": f'"{spool}"'})
    sink.behaviour.delays["DOT"] = 0.5
    body = big_body()
    c = await send(gate, body)
    await asyncio.sleep(0.3)  # the upstream is thinking about the final dot
    files = os.listdir(spool)
    assert len(files) == 1 and files[0].startswith("spamgate-")
    assert os.path.getsize(spool / files[0]) == len(body)
    assert (await c.reply()).code == 250
    assert os.listdir(spool) == []  # gone once relayed
    assert sink.messages[0].original == body
    # a small one stays in memory
    c2 = await send(gate, b"Subject: small\r\n\r\nhi\r\n")
    assert (await c2.reply()).code == 250 and os.listdir(spool) == []
    assert sink.messages[1].original == b"Subject: small\r\n\r\nhi\r\n"


async def test_the_spool_file_goes_when_the_client_does(
    gate_factory: GateFactory, sink: Sink, tmp_path
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    gate = await gate_factory("[limits]\nspool_size = 4096\n", server={"spool_dir": f'"{spool}"'})
    c, _ = await gate.client(source="127.0.0.1")
    for line in ("EHLO client.test", "MAIL FROM:<a@example.test>", "RCPT TO:<u@example.test>"):
        await c.cmd(line)
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: x\r\n\r\n" + (b"z" * 98 + b"\r\n") * 1000)
    for _ in range(50):
        if os.listdir(spool):
            break
        await asyncio.sleep(0.02)
    assert len(os.listdir(spool)) == 1  # spooling
    await c.close()
    for _ in range(50):
        if not os.listdir(spool):
            break
        await asyncio.sleep(0.02)
    assert os.listdir(spool) == []
    assert sink.messages == []


async def test_a_header_block_over_the_limit_is_refused(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory("[limits]\nheader_size = 2000\nspool_size = 1000\n")
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 60) for i in range(40))
    c = await send(gate, headers + b"\r\nbody\r\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (552, "5.3.4")
    assert "header" in r.text
    # the session goes on; a message whose headers fit is relayed
    for line in ("MAIL FROM:<a@example.test>", "RCPT TO:<u@example.test>"):
        assert (await c.cmd(line)).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(headers[:1500] + b"\r\nbody\r\n.\r\n")
    assert (await c.reply()).code == 250
    assert len(sink.messages) == 1
