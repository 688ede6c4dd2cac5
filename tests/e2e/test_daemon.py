"""The service side: root dropped after binding, sd_notify, journal-friendly logs.

These run `python -m spamgate run` as a real process, as systemd or an init
script would, and talk to it over loopback.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import pwd
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence

import pytest

from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

ROOT = pathlib.Path(__file__).resolve().parents[2]
BODY = b"Subject: daemon\r\n\r\nhello\r\n"


def free_port(low: bool = False) -> int:
    """A free loopback port; with `low`, one below 1024 (only root may bind it)."""
    candidates = range(700, 1000) if low else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    pytest.fail("no free port")


@pytest.fixture
def world_dir():
    """A directory every user can read: the config must stay readable after the drop."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="spamgate-daemon-"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


class Notifications:
    """A stand-in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        path.chmod(0o777)  # the service sends READY=1 after it stopped being root

    async def next(self, timeout: float = 20) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            return (await loop.sock_recv(self.sock, 4096)).decode()

    def close(self) -> None:
        self.sock.close()


async def start(
    config: pathlib.Path,
    env: dict[str, str],
    stderr_path: pathlib.Path,
    under: Sequence[str] = (),
) -> asyncio.subprocess.Process:
    """`spamgate run -c config` as its own process (`under`: a command that runs
    it, such as the systemd unit's system-call filter)."""
    with open(stderr_path, "wb") as err:
        return await asyncio.create_subprocess_exec(
            *under,
            sys.executable,
            "-m",
            "spamgate",
            "run",
            "-c",
            str(config),
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )


def ids(pid: int) -> tuple[list[int], list[int]]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gid = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return [int(x) for x in uid], [int(x) for x in gid]


async def test_root_is_dropped_after_binding_a_low_port(
    sink: Sink, dns_server: DnsServer, world_dir
) -> None:
    if os.geteuid() != 0:
        pytest.skip("starting as root is what this test is about")
    nobody = pwd.getpwnam("nobody")
    port = free_port(low=True)
    config = world_dir / "spamgate.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.test"\nuser = "nobody"\n'
        f'relay_domains = ["example.test"]\n\n[upstream]\naddress = "{sink.address}"\n\n'
        # the client's reverse lookup runs too, after the drop
        f'[dns]\nnameservers = ["{dns_server.address}"]\n'
    )
    notes = Notifications(world_dir / "notify")
    proc = await start(config, {"NOTIFY_SOCKET": str(notes.path)}, world_dir / "stderr")
    try:
        ready = await notes.next()
        assert ready.splitlines() == ["READY=1", f"MAINPID={proc.pid}"]
        # bound as root (port < 1024), then became nobody for good
        assert ids(proc.pid) == ([nobody.pw_uid] * 4, [nobody.pw_gid] * 4)
        c, banner = await RawClient.connect(port)
        assert banner.code == 220
        replies = await c.mail("a@example.org", ["u@example.test"], BODY)
        assert replies[-1].code == 250
        await c.cmd("QUIT")
        assert len(sink.messages) == 1
        # systemctl reload: SIGHUP, and the config is still readable as nobody
        proc.send_signal(signal.SIGHUP)
        assert await notes.next() == "RELOADING=1"
        assert await notes.next() == "READY=1"
        proc.send_signal(signal.SIGTERM)
        assert await notes.next() == "STOPPING=1"
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        notes.close()
    log = (world_dir / "stderr").read_text()
    assert "running as user nobody" in log
    assert "reloaded configuration" in log
    assert "reload refused" not in log


async def test_unknown_user_stops_startup(world_dir) -> None:
    if os.geteuid() != 0:
        pytest.skip("the user is only looked up when started as root")
    config = world_dir / "spamgate.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nuser = "no-such-user-here"\n'
        "[dns]\nreverse_lookup = false\n"
    )
    proc = await start(config, {}, world_dir / "stderr")
    assert await asyncio.wait_for(proc.wait(), 20) == 1
    log = (world_dir / "stderr").read_text()
    assert "spamgate: [server] user no-such-user-here: no such user" in log
    assert "Traceback" not in log


async def test_logs_for_the_journal(world_dir) -> None:
    stderr_path = world_dir / "stderr"
    stderr_path.touch()
    st = stderr_path.stat()
    port = free_port()
    config = world_dir / "spamgate.toml"
    # as root, stay root here (no user): a warning, which the journal should see as one
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[dns]\nreverse_lookup = false\n')
    proc = await start(config, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, stderr_path)
    try:
        for _ in range(200):
            if "listening on" in stderr_path.read_text():
                break
            await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    lines = stderr_path.read_text().splitlines()
    assert f"<6>spamgate: spamgate listening on 127.0.0.1:{port}, upstream" in "\n".join(lines)
    # no timestamps of our own: the journal has them
    assert all(line.startswith("<") for line in lines), lines
    if os.geteuid() == 0:
        assert "<4>spamgate: running as root: set [server] user" in "\n".join(lines)


@pytest.mark.parametrize("uvloop", [True, False])
async def test_event_loop_choice(sink: Sink, world_dir, uvloop: bool) -> None:
    """uvloop by default ([server] uvloop), asyncio's own loop when turned off."""
    port = free_port()
    config = world_dir / "spamgate.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.test"\n'
        f'relay_domains = ["example.test"]\n{"" if uvloop else "uvloop = false"}\n'
        f'[upstream]\naddress = "{sink.address}"\n[dns]\nreverse_lookup = false\n'
    )
    stderr_path = world_dir / "stderr"
    proc = await start(config, {}, stderr_path)
    try:
        for _ in range(200):
            if "listening on" in stderr_path.read_text():
                break
            await asyncio.sleep(0.05)
        c, _ = await RawClient.connect(port)
        replies = await c.mail("a@example.org", ["u@example.test"], BODY)
        assert replies[-1].code == 250
        await c.cmd("QUIT")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    expected = "uvloop" if uvloop else "asyncio"
    assert f"mode enforce, loop {expected}" in stderr_path.read_text()


def test_open_files_limit_raised_and_checked() -> None:
    """Two descriptors a session: the soft limit goes up to the hard one, and a hard
    limit too low for max_sessions is said at startup."""
    import resource
    import subprocess

    code = (
        "import logging, resource\n"
        "from spamgate.ops.daemon import raise_fd_limit\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "raise_fd_limit(5000)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096)),
        check=True,
    )
    assert out.stdout.strip() == "(4096, 4096)"
    assert "open-files limit 4096 is below the 10256" in out.stderr
