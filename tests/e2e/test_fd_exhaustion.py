"""Out of file descriptors: new clients get 421, and spamgate recovers by itself.

A real `spamgate run` process with `ulimit -n 64` (soft and hard, so it cannot
raise it). Clients connect until spamgate refuses them: from the watermark on
(`watermark` in spamgate/ops/descriptors.py: 24 here) each newcomer is told
`421 4.3.2` at once, and the sessions already in have room for their upstream
connection. In the second test the limit is lowered under the running process
to exactly what it holds, as DNS queries, spool files or a burst of sessions
would use it up, so accept() itself fails (EMFILE): the reserve descriptor still
gets each waiting client a 421 within about a second (asyncio's accept retry),
not silence. In both, the sessions already open carry on, and once they end, new
clients are greeted and mail flows again, with no restart.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.kit.ports import free_port
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from .test_reload import ROOT_DIR

LIMIT = 64
OUT = "421 4.3.2 gate.test Error: out of resources, try again later"
BODY = b"Subject: fd\r\n\r\nok\r\n"


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


# uvloop's subprocesses inherit the test process's descriptors (it has no
# close_fds), which would take some of the 64: spamgate is started through this,
# which closes them and then becomes `python -m spamgate ...`.
CLOSE_AND_EXEC = (
    "import os, sys; os.closerange(3, 65536); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


class Gate:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc, self.port = proc, port
        self.log: list[str] = []

    async def read_log(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.log.append(line.decode())

    def logged(self, text: str) -> list[str]:
        return [line for line in self.log if text in line]

    async def fill(self) -> tuple[list[RawClient], str]:
        """Connect until refused; the greeted clients and the refusal."""
        clients: list[RawClient] = []
        for _ in range(LIMIT):
            c, banner = await RawClient.connect(self.port)
            assert banner is not None
            if banner.code != 220:
                return clients, str(banner)
            clients.append(c)
        raise AssertionError("never refused")

    async def recovers(self, sink: Sink) -> None:
        """A new client is greeted and its message delivered, within a few seconds."""
        deadline = time.monotonic() + 5
        while True:
            c, banner = await RawClient.connect(self.port)
            assert banner is not None
            if banner.code == 220 or time.monotonic() > deadline:
                break
            await c.close()
        assert banner.code == 220
        before = len(sink.messages)
        assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
        assert len(sink.messages) == before + 1
        await c.cmd("QUIT")


async def start(
    tmp_path: Path, sink: Sink, extra: str = "", server: str = ""
) -> AsyncIterator[Gate]:
    port = free_port()
    cfg = tmp_path / "spamgate.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.test"\n'
        'relay_domains = ["example.test"]\nmynetworks = ["127.0.0.1/32"]\n'
        f"reload_interval = 0\n{server}[upstream]\n"
        f'address = "{sink.address}"\n'
        "[limits]\nsessions_per_client = 1000\n" + extra
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-c", CLOSE_AND_EXEC, "-m", "spamgate", "run", "-c", str(cfg)),
        cwd=ROOT_DIR,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=low_limit,
    )
    g = Gate(proc, port)
    reader = asyncio.create_task(g.read_log())
    try:
        async with asyncio.timeout(15):
            while not g.logged("listening on"):
                await asyncio.sleep(0.05)
        assert g.logged(f"open file limit {LIMIT} is below")
        yield g
        assert proc.returncode is None  # it never fell over
        assert not g.logged("Traceback")
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        reader.cancel()


@pytest.fixture
async def gate(tmp_path: Path, sink: Sink) -> AsyncIterator[Gate]:
    async for g in start(tmp_path, sink, "[dns]\nreverse_lookup = false\n"):
        yield g


@pytest.fixture
async def asyncio_gate(tmp_path: Path, sink: Sink) -> AsyncIterator[Gate]:
    # asyncio's loop: its accept() failures reach spamgate's reserve descriptor.
    # (uvloop's libuv closes such a connection itself, with no reply; there the
    # watermark of the test above is what answers 421.)
    extra = "[dns]\nreverse_lookup = false\n"
    async for g in start(tmp_path, sink, extra, server="uvloop = false\n"):
        yield g


def lowest_free_descriptor(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(fd for fd in range(LIMIT + 1) if fd not in used)


async def test_new_clients_get_421_before_the_limit(gate: Gate, sink: Sink) -> None:
    clients, refusal = await gate.fill()
    assert refusal == OUT
    assert 8 < len(clients) < 24  # 24 is the watermark; some are spamgate's own
    banners = await asyncio.gather(*(RawClient.connect(gate.port) for _ in range(10)))
    assert [str(b) for _, b in banners] == [OUT] * 10
    # The sessions already in have room for their upstream: every one sends mail.
    replies = await asyncio.gather(
        *(c.mail("a@example.org", ["u@example.test"], BODY) for c in clients)
    )
    assert all(r[-1].code == 250 for r in replies)
    assert len(sink.messages) == len(clients)
    for c in clients:
        await c.cmd("QUIT")
        await c.close()
    await gate.recovers(sink)
    assert not gate.logged("out of file descriptors")  # the watermark was enough


async def test_accept_failure_is_answered_421(asyncio_gate: Gate, sink: Sink) -> None:
    gate = asyncio_gate
    pid = gate.proc.pid
    clients = []
    for i in range(3):
        c, banner = await RawClient.connect(gate.port, source=f"127.0.1.{i + 1}")
        assert banner is not None and banner.code == 220
        clients.append(c)
    # What DNS queries, spool files or a burst of sessions do on a busy server,
    # made exact: the soft limit drops to the lowest free descriptor, so the next
    # one spamgate opens, whatever opens it, fails with EMFILE; accept() first.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (lowest_free_descriptor(pid), LIMIT))
    started = time.monotonic()
    late = await asyncio.gather(
        *(RawClient.connect(gate.port, source=f"127.0.2.{i + 1}") for i in range(10))
    )
    assert [str(banner) for _, banner in late] == [OUT] * 10
    assert time.monotonic() - started < 3
    async with asyncio.timeout(3):  # the log is read from spamgate's stderr as it comes
        while not gate.logged("out of file descriptors"):
            await asyncio.sleep(0.02)
    warnings = gate.logged("out of file descriptors")
    assert len(warnings) == 1  # one line, not one per client
    assert "Too many open files" in warnings[0]
    for c, _ in late:
        await c.close()
    # Descriptors free again: the sessions in carry on, and new clients are served.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
    replies = await asyncio.gather(
        *(c.mail("a@example.org", ["u@example.test"], BODY) for c in clients)
    )
    assert all(r[-1].code == 250 for r in replies)
    for c in clients:
        await c.cmd("QUIT")
        await c.close()
    await gate.recovers(sink)
