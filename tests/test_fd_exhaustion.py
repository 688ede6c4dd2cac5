"""Out of file descriptors: new clients get 421, and spamgate recovers by itself.

A real `spamgate run` process with `ulimit -n 64` (soft and hard, so it cannot
raise it): clients connect until the process has no descriptor left for the
next one. That one, and every client that comes while it lasts, must get
`421 4.3.2` within about a second (asyncio's accept retry), not silence; the
sessions already open carry on; once they end, new clients are greeted and mail
flows again, with no restart.
"""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from pathlib import Path

from .sink import Sink
from .smtpclient import RawClient
from .test_reload import ROOT_DIR, free_port

LIMIT = 64
OUT = "421 4.3.2 gate.test Error: out of resources, try again later"


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


async def test_out_of_descriptors(tmp_path: Path, sink: Sink) -> None:
    port = free_port()
    cfg = tmp_path / "spamgate.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.test"\n'
        'relay_domains = ["example.test"]\nmynetworks = ["127.0.0.1/32"]\n'
        f'reload_interval = 0\n[upstream]\naddress = "{sink.address}"\n'
        "[dns]\nreverse_lookup = false\n[limits]\nsessions_per_client = 1000\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "spamgate", "run", "-c", str(cfg)),
        cwd=ROOT_DIR,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=low_limit,
    )
    assert proc.stderr is not None
    log: list[str] = []

    async def read_log() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            log.append(line.decode())

    reader = asyncio.create_task(read_log())
    clients: list[RawClient] = []
    try:
        async with asyncio.timeout(15):
            while not any("listening on" in line for line in log):
                await asyncio.sleep(0.05)
        assert any(f"open file limit {LIMIT} is below" in line for line in log)

        # Fill every descriptor: each greeted client holds one.
        refused = None
        for _ in range(LIMIT):
            c, banner = await RawClient.connect(port)
            assert banner is not None
            if banner.code != 220:
                refused = banner
                break
            clients.append(c)
        assert refused is not None, "never ran out of descriptors"
        assert str(refused) == OUT
        assert 30 < len(clients) < LIMIT

        # While it lasts, every newcomer is told so, promptly.
        started = time.monotonic()
        banners = await asyncio.gather(*(RawClient.connect(port) for _ in range(10)))
        assert [str(b) for _, b in banners] == [OUT] * 10
        assert time.monotonic() - started < 3
        # The sessions already open are unaffected.
        assert (await clients[0].cmd("EHLO c.test")).code == 250
        assert (await clients[-1].cmd("NOOP")).code == 250

        # Sessions end; descriptors come back; no restart needed.
        for c in clients:
            await c.send(b"QUIT\r\n")
            await c.close()
        clients.clear()
        deadline = time.monotonic() + 5
        while True:
            c, banner = await RawClient.connect(port)
            assert banner is not None
            if banner.code == 220 or time.monotonic() > deadline:
                break
            await c.close()
        assert banner.code == 220
        replies = await c.mail("a@example.org", ["u@example.test"], b"Subject: fd\r\n\r\nok\r\n")
        assert replies[-1].code == 250
        assert len(sink.messages) == 1
        await c.cmd("QUIT")
        assert proc.returncode is None
        warnings = [line for line in log if "out of file descriptors" in line]
        assert len(warnings) == 1  # one line, not one per refused client
        assert "Too many open files" in warnings[0]
    finally:
        for c in clients:
            await c.close()
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
        reader.cancel()
