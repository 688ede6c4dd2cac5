"""What a message in flight costs in memory, measured with tracemalloc around a
5 MB message through the real socket path (client → spamgate → upstream sink).

The client sends from one buffer it built beforehand, 64 KB at a time, and the
sink hashes the content without keeping it, so what the peak measures is
spamgate's own working memory for the message (docs/memory.md).
"""

from __future__ import annotations

import gc
import re
import tracemalloc

from tests.kit.sink import Sink

from ..conftest import GateFactory

SIZE = 5 * 1024 * 1024


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again\r\n"
    head = b"From: <a@example.test>\r\nTo: <u@example.test>\r\nSubject: big\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


async def peak_for(gate, body: bytes) -> int:
    wire = re.sub(rb"(?m)^\.", b"..", body) + b".\r\n"
    c, _ = await gate.client(source="127.0.0.1")
    for line in ("EHLO client.test", "MAIL FROM:<a@example.test>", "RCPT TO:<u@example.test>"):
        assert (await c.cmd(line)).code == 250
    assert (await c.cmd("DATA")).code == 354
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        view = memoryview(wire)
        for i in range(0, len(view), 65536):
            c.writer.write(view[i : i + 65536])
            await c.writer.drain()
        reply = await c.reply(timeout=30)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert reply.code == 250
    await c.close()
    return peak


async def test_a_spooled_message_costs_a_few_blocks_not_its_size(
    gate_factory: GateFactory, sink: Sink, tmp_path
) -> None:
    sink.behaviour.keep_content = False
    body = message(SIZE)
    spooled = await gate_factory(server={"spool_dir": f'"{tmp_path}"'})  # spool_size 1 MB
    in_memory = await gate_factory("[limits]\nspool_size = 100000000\n")
    peak_spooled = await peak_for(spooled, body)
    peak_memory = await peak_for(in_memory, body)
    for received in sink.messages:
        assert received.size >= len(body)  # the message, and any header spamgate added
    # Held on disk: the first spool_size bytes (1 MB, as the pieces they arrived in)
    # until spooling starts, then the read buffer and the blocks being written and
    # relayed: spool_size and about 1 MB, whatever the message's size. In memory:
    # the message itself, plus the pieces it was joined from.
    assert peak_spooled < 1048576 + 1280 * 1024, peak_spooled
    assert peak_memory > SIZE, peak_memory
    print(f"\npeak for a {SIZE} byte message: spooled {peak_spooled}, in memory {peak_memory}")
