"""Several worker processes ([server] workers): `spamgate run` as a real supervisor.

The supervisor binds, drops root, starts the workers, forwards SIGHUP and SIGTERM
and starts a dead worker again; each worker is a whole server. These run the
command as an init system would and talk to it over loopback.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import pathlib
import pwd
import re
import signal
import sys

import pytest

from spamgate.app import build, loads
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import config_text
from .test_daemon import Notifications, free_port, ids, world_dir  # noqa: F401 - fixture
from .test_multiprocess import get, scrape

ROOT = pathlib.Path(__file__).resolve().parents[2]
BODY = b"Subject: workers\r\n\r\nhello\r\n"


def children(pid: int) -> list[int]:
    try:
        text = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Running:
    """`spamgate run` in the background, with its stderr in a file (`module`: the
    command's module, e.g. a test's own that adds checks)."""

    def __init__(
        self,
        directory: pathlib.Path,
        text: str,
        env: dict[str, str] | None = None,
        name: str = "spamgate",
        module: str = "spamgate",
    ) -> None:
        self.config = directory / f"{name}.toml"
        self.config.write_text(text)
        self.stderr = directory / f"{name}.stderr"
        self.env = env or {}
        self.module = module
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> asyncio.subprocess.Process:
        with open(self.stderr, "wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                "run",
                "-c",
                str(self.config),
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
            )
        return self.proc

    @property
    def log(self) -> str:
        return self.stderr.read_text()

    async def wait_log(self, pattern: str, count: int = 1, timeout: float = 20) -> list[str]:
        async with asyncio.timeout(timeout):
            while True:
                found = re.findall(pattern, self.log)
                if len(found) >= count:
                    return found
                assert self.proc is not None
                if self.proc.returncode is not None:
                    raise AssertionError(f"exited {self.proc.returncode}:\n{self.log}")
                await asyncio.sleep(0.05)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def workers_config(sink: Sink, port: int, extra: str = "", **server: str) -> str:
    settings = {"listen": f'["127.0.0.1:{port}"]', "workers": "2", **server}
    return config_text(sink, extra, server=settings)


async def send(port: int, count: int) -> list[int]:
    """`count` sessions at once, one message each; the final reply codes."""

    async def one() -> int:
        c, _ = await RawClient.connect(port)
        replies = await c.mail("a@example.org", ["u@example.test"], BODY)
        await c.cmd("QUIT")
        await c.close()
        return replies[-1].code

    return list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.fixture
async def running(world_dir):  # noqa: F811
    started: list[Running] = []

    def make(text: str, env: dict[str, str] | None = None) -> Running:
        r = Running(world_dir, text, env)
        started.append(r)
        return r

    yield make
    for r in started:
        await r.kill()


async def test_two_workers_serve_reload_and_stop(sink: Sink, running) -> None:
    port = free_port()
    gate = running(workers_config(sink, port))
    proc = await gate.start()
    await gate.wait_log(r"supervisor: 2 workers")
    workers = children(proc.pid)
    assert len(workers) == 2
    assert await send(port, 24) == [250] * 24
    assert len(sink.messages) == 24
    # each worker took a share: the kernel spreads connections over their sockets
    served = set(await gate.wait_log(r"spamgate\.session\[(\d+)\]: sid=\w+ client=", 24))
    assert served == {str(p) for p in workers}
    proc.send_signal(signal.SIGHUP)  # both reload, each on its own
    reloads = await gate.wait_log(r"spamgate\[(\d+)\]: reloaded configuration", 2)
    assert set(reloads) == {str(p) for p in workers}
    assert await gate.stop() == 0
    assert all(not pathlib.Path(f"/proc/{p}").exists() for p in workers)
    assert "supervisor: stopped" in gate.log


async def test_dead_worker_started_again(sink: Sink, running) -> None:
    port = free_port()
    gate = running(workers_config(sink, port))
    proc = await gate.start()
    await gate.wait_log(r"supervisor: 2 workers")
    first, second = children(proc.pid)
    os.kill(first, signal.SIGKILL)
    await gate.wait_log(r"worker \d \(pid \d+\) ended \(signal SIGKILL\)")
    await gate.wait_log(r"worker \d started again \(pid \d+\)")
    now = children(proc.pid)
    assert second in now and first not in now and len(now) == 2
    await gate.wait_log(r"listening on", 3)
    # connections the kernel gives the new worker's socket are served
    assert await send(port, 16) == [250] * 16
    assert await gate.stop() == 0


async def test_workers_run_without_root(sink: Sink, running) -> None:
    if os.geteuid() != 0:
        pytest.skip("starting as root is what this test is about")
    nobody = pwd.getpwnam("nobody")
    port = free_port(low=True)
    gate = running(workers_config(sink, port, user='"nobody"'))
    notes = Notifications(gate.config.parent / "notify")
    gate.env["NOTIFY_SOCKET"] = str(notes.path)
    try:
        proc = await gate.start()
        assert (await notes.next()).splitlines() == ["READY=1", f"MAINPID={proc.pid}"]
        for pid in [proc.pid, *children(proc.pid)]:
            assert ids(pid) == ([nobody.pw_uid] * 4, [nobody.pw_gid] * 4)
        assert await send(port, 4) == [250] * 4
        proc.send_signal(signal.SIGHUP)
        assert await notes.next() == "RELOADING=1"
        assert await notes.next() == "READY=1"
        assert await gate.stop() == 0
        assert await notes.next() == "STOPPING=1"
    finally:
        notes.close()


async def test_worker_that_cannot_start_stops_startup(sink: Sink, running, world_dir) -> None:  # noqa: F811
    (world_dir / "recipient").write_text("u@example.test REJCT\n")
    gate = running(workers_config(sink, free_port(), '[rules]\nrecipient = ["hash:recipient"]\n'))
    proc = await gate.start()
    assert await asyncio.wait_for(proc.wait(), 30) == 1
    assert "recipient:1:" in gate.log and "failed to start" in gate.log


async def test_port_in_use(sink: Sink, running, world_dir) -> None:  # noqa: F811
    port = free_port()
    first = running(workers_config(sink, port))
    await first.start()
    await first.wait_log(r"supervisor: 2 workers")
    second = Running(world_dir, workers_config(sink, port), name="second")
    proc = await second.start()
    assert await asyncio.wait_for(proc.wait(), 20) == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in second.log
    assert await first.stop() == 0


def test_max_sessions_shared_out() -> None:
    config = loads(config_text(None, "[limits]\nmax_sessions = 3\n"))
    runtime = build(config, share=2).runtime
    addresses = [f"127.0.0.{n}" for n in range(1, 4)]
    admitted = [runtime.admit(ipaddress.ip_address(a)) for a in addresses]
    assert admitted == [None, None, "max_sessions"]  # this worker's part: 2 of 3


def test_stress_is_near_each_workers_own_part() -> None:
    """With workers, stress engages near a worker's part of max_sessions: it never
    has more, so a threshold on the whole of it would never be reached."""
    config = loads(config_text(None, "[limits]\nmax_sessions = 8\nstress_threshold = 0.5\n"))
    runtime = build(config, share=4).runtime  # 2 sessions each; stress from 1
    assert runtime.admit(ipaddress.ip_address("127.0.0.1")) is None
    assert runtime.stressed
    runtime.release(ipaddress.ip_address("127.0.0.1"))
    assert not runtime.stressed


async def test_metrics_sum_over_workers(sink: Sink, running) -> None:
    """The supervisor serves /metrics: every worker's sessions, counted once each."""
    port, metrics_port = free_port(), free_port()
    extra = f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n'
    gate = running(workers_config(sink, port, extra))
    proc = await gate.start()
    await gate.wait_log(r"metrics on http://127\.0\.0\.1:\d+/metrics \(all workers\)")
    workers = children(proc.pid)
    assert await send(port, 20) == [250] * 20
    served = set(await gate.wait_log(r"spamgate\.session\[(\d+)\]: sid=\w+ client=", 20))
    assert served == {str(p) for p in workers}  # both did some of it
    samples = await asyncio.to_thread(scrape, metrics_port)
    assert get(samples, "spamgate_sessions_total", frontend="proxy") == 20
    assert get(samples, "spamgate_transactions_total", frontend="proxy", outcome="accepted") == 20
    ready = await asyncio.to_thread(status, metrics_port, "/readyz")
    assert ready == (200, "ok\n2 workers serving\n")
    # a worker that dies takes its live gauges with it; its counts stay in the sum
    os.kill(workers[0], signal.SIGKILL)
    await gate.wait_log(r"worker \d started again")
    samples = await asyncio.to_thread(scrape, metrics_port)
    assert get(samples, "spamgate_sessions_total", frontend="proxy") == 20
    assert await gate.stop() == 0
    assert not list(pathlib.Path("/tmp").glob(f"spamgate-metrics-*/*_{workers[1]}.db"))


def status(port: int, path: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
