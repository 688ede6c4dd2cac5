"""The milter front end when things go wrong, or get big: a real Postfix, spamgate as
a process (`spamgate run`, the real CLI) where the test kills it or measures it.

* spamgate killed mid-session, with `milter_default_action = tempfail`: the client
  gets 4xx at the next command, or at the final dot, and nothing is queued;
* a check slower than Postfix's milter timeouts: spamgate answers tempfail in
  time and the session goes on; a check past its own timeout follows on_error;
* a 20 MB message streamed through the Spool: the process's peak RSS grows by a
  few megabytes, not by the message (the same message kept in memory, as a
  control, grows it by more than its size);
* unix sockets with their mode and group, workers sharing them, reload.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pathlib
import re
import shutil
import signal
import stat
import tempfile

import pytest

from spamgate import metrics
from tests.kit.dnsserver import DnsServer
from tests.kit.postfix import PostfixInstance, free_port
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory, PostfixFactory, config_text
from .slowcheck import CHECKS as SLOW_CHECKS
from .test_milter_frontend import (
    OUTSIDER,
    MilterPostfix,
    marker,
    message,
    milter_lines,
    postqueue,
    queue_id,
    send,
)
from .test_workers import Running

TEMPFAIL = "451 4.7.1 Service unavailable - try again later"  # Postfix's words


@pytest.fixture(scope="module")
def mp(postfix_factory: PostfixFactory) -> MilterPostfix:
    address = f"inet:127.0.0.1:{free_port()}"
    return MilterPostfix(postfix_factory(main_extra=milter_lines(address)), address)


@pytest.fixture
async def running(tmp_path):
    started: list[Running] = []

    def make(text: str, module: str = "spamgate", name: str = "spamgate") -> Running:
        r = Running(tmp_path, text, name=name, module=module)
        started.append(r)
        return r

    yield make
    for r in started:
        await r.kill()


def gate_config(dns: DnsServer, milter: str, extra: str = "", **server: str) -> str:
    return config_text(None, milter + extra, server={"listen": "[]", **server}, dns=dns)


def status(pid: int, field: str) -> int:
    """A /proc/PID/status figure in kB (VmRSS, VmHWM)."""
    text = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


# -- spamgate dies ----------------------------------------------------------------------


async def test_killed_mid_session_gives_4xx_and_loses_nothing(
    mp: MilterPostfix, dns_server: DnsServer, running
) -> None:
    slow = "\n[slow]\nseconds = 60\ntimeout = 90\n"
    gate = running(
        gate_config(dns_server, mp.toml(content_timeout="150"), slow), module="tests.e2e.slowcheck"
    )
    for phase in ("envelope", "end of data"):
        proc = await gate.start()
        await gate.wait_log(r"milter listening on inet:127\.0\.0\.1")
        mark = marker()
        c, _ = await RawClient.connect(mp.postfix.port, source=OUTSIDER)
        assert (await c.cmd("EHLO client.example.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
        if phase == "envelope":
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            r = await c.cmd("RCPT TO:<u@example.test>")
            assert str(r) == TEMPFAIL
        else:
            assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            await c.send(message(mark, subject="slow") + b".\r\n")
            # Postfix waits for the end-of-message answer; the slow check holds it
            await gate.wait_log(r"slow check: 60 s at end of data")
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            r = await c.reply(timeout=30)
            assert str(r) == TEMPFAIL, r
            await asyncio.to_thread(
                mp.postfix.wait_log, r"milter-reject: END-OF-MESSAGE from unknown\[127\.0\.0\.40\]"
            )
        await c.close()
        # nothing accepted, nothing queued: the client keeps the message and retries
        assert [m for m in postqueue(mp.postfix)] == []
        assert not any(mark.encode() in m for m in mp.postfix.delivered())


# -- slow checks --------------------------------------------------------------------------


async def test_a_slow_check_never_holds_postfix_past_its_timeout(
    gate_factory: GateFactory, mp: MilterPostfix, caplog: pytest.LogCaptureFixture
) -> None:
    """[milter] command_timeout = 3 (Postfix's milter_command_timeout, as set): a
    check still running at 2.5 s gets Postfix a tempfail in time, and the session
    goes on; a check past its own timeout follows its on_error first."""
    slow = "\n[slow]\nseconds = 8\ntimeout = 30\n"
    await gate_factory(mp.toml(command_timeout="3") + slow, checks=SLOW_CHECKS)
    before = metrics.MILTER_ERRORS.labels("deadline")._value.get()
    mark = marker()
    c, _ = await RawClient.connect(mp.postfix.port, source=OUTSIDER)
    assert (await c.cmd("EHLO client.example.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    r = await c.cmd("RCPT TO:<slow@example.test>", timeout=6)
    assert str(r) == TEMPFAIL
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(message(mark) + b".\r\n")
    assert (await c.reply()).code == 250
    await c.close()
    await asyncio.to_thread(mp.postfix.wait_delivered, mark.encode())
    assert metrics.MILTER_ERRORS.labels("deadline")._value.get() == before + 1
    assert "no decision on Rcpt within 2.5 s; answering TempFail" in caplog.text


@pytest.mark.parametrize("on_error", ["continue", "tempfail"])
async def test_a_check_past_its_own_timeout_follows_on_error(
    gate_factory: GateFactory, mp: MilterPostfix, on_error: str
) -> None:
    slow = f'\n[slow]\nseconds = 8\ntimeout = 0.3\non_error = "{on_error}"\n'
    await gate_factory(mp.toml() + slow, checks=SLOW_CHECKS)
    c, _ = await RawClient.connect(mp.postfix.port, source=OUTSIDER)
    assert (await c.cmd("EHLO client.example.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    r = await c.cmd("RCPT TO:<slow@example.test>")
    if on_error == "continue":
        assert r.code == 250
    else:
        assert r.code == 451 and str(r) != TEMPFAIL  # spamgate's own words
    await c.close()


# -- a big message --------------------------------------------------------------------------


def big_message(mark: str, size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again and again\r\n"
    head = message(mark, subject="big").split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
    return head + line * ((size - len(head)) // len(line))


async def peak_growth(postfix: PostfixInstance, pid: int, body: bytes, mark: str) -> int:
    """How much the process's peak RSS grew (kB) while `body` went through."""
    before = status(pid, "VmHWM")
    c, _ = await RawClient.connect(postfix.port, source=OUTSIDER)
    for line in ("EHLO x.example.test", "MAIL FROM:<a@example.org>", "RCPT TO:<u@example.test>"):
        assert (await c.cmd(line)).code == 250
    assert (await c.cmd("DATA")).code == 354
    view = memoryview(body + b".\r\n")
    for i in range(0, len(view), 1 << 16):
        c.writer.write(view[i : i + (1 << 16)])
        await c.writer.drain()
    r = await c.reply(timeout=120)
    assert r.code == 250, r
    await c.close()
    await asyncio.to_thread(postfix.wait_log, rf"{queue_id(r)}: removed", 60)
    return status(pid, "VmHWM") - before


async def test_a_20_mb_message_is_streamed_with_bounded_memory(
    mp: MilterPostfix, dns_server: DnsServer, running, tmp_path
) -> None:
    size = 20 * 1024 * 1024
    limits = "\n[limits]\nmessage_size = 30000000\n"
    growth = {}
    for name, spool_size in (("spooled", 1048576), ("in memory", 100000000)):
        text = gate_config(
            dns_server,
            mp.toml(),
            limits + f"spool_size = {spool_size}\n",
            spool_dir=f'"{tmp_path}"',
        )
        gate = running(text, name=name.replace(" ", "-"))
        proc = await gate.start()
        await gate.wait_log(r"milter listening on")
        # one small message first: what every message costs is paid before measuring
        assert (await send(mp.postfix.port, message(marker())))[-1].code == 250
        mark = marker()
        growth[name] = await peak_growth(mp.postfix, proc.pid, big_message(mark, size), mark)
        assert await gate.stop() == 0
        assert not list(tmp_path.glob("spamgate-*.eml"))  # the spool file went with it
    print(f"\npeak RSS growth for a 20 MB message (kB): {growth}")
    assert growth["spooled"] < 8 * 1024, growth
    assert growth["in memory"] > size // 1024, growth


# -- sockets, workers, reload ------------------------------------------------------------------


async def test_unix_socket_mode_group_and_workers(
    postfix_factory: PostfixFactory, mp: MilterPostfix, dns_server: DnsServer, running, tmp_path
) -> None:
    """`spamgate run` with two workers, serving a TCP milter socket (one per worker)
    and a unix one (shared) that Postfix reaches through its group."""
    # Not under tmp_path, whose parent only root may enter: Postfix's smtpd must reach it
    directory = pathlib.Path(tempfile.mkdtemp(prefix="sg-milter-", dir="/tmp"))
    directory.chmod(0o755)
    path = directory / "milter.sock"
    unix = postfix_factory(main_extra=milter_lines(f"unix:{path}"))
    milter = (
        f'\n[milter]\nlisten = ["inet:127.0.0.1:{mp.port}", "unix:{path}"]\n'
        'socket_mode = "0660"\nsocket_group = "postfix"\n'
    )
    gate = running(gate_config(dns_server, milter, workers="2"))
    await gate.start()
    await gate.wait_log(r"supervisor: 2 workers")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == grp.getgrnam("postfix").gr_gid
    marks = {}
    for postfix in (mp.postfix, unix):
        batch = [marker() for _ in range(12)]
        results = await asyncio.gather(
            *(
                send(postfix.port, message(m), source=f"127.0.0.{60 + i}")
                for i, m in enumerate(batch)
            )
        )
        assert all(r[-1].code == 250 for r in results), postfix.log_tail()
        marks[postfix.port] = batch
    for postfix in (mp.postfix, unix):
        for m in marks[postfix.port]:
            raw = await asyncio.to_thread(postfix.wait_delivered, m.encode())
            assert b"Authentication-Results: gate.test;" in raw
    # both workers took sessions: each logs its transactions under its own pid
    pids = set(re.findall(r"spamgate\.session\[(\d+)\]: sid=", gate.log))
    assert len(pids) == 2, gate.log
    assert await gate.stop() == 0
    assert not path.exists()  # removed at shutdown
    directory.rmdir()


async def test_reload_changes_milter_decisions(
    gate_factory: GateFactory, mp: MilterPostfix, tmp_path
) -> None:
    table = tmp_path / "recipient"
    table.write_text("first@example.test  REJECT first rule\n")
    gate = await gate_factory('[rules]\nrecipient = ["hash:recipient"]\n' + mp.toml())
    replies = await send(mp.postfix.port, message(marker()), rcpts=("second@example.test",))
    assert replies[2].code == 250
    table.write_text("second@example.test  REJECT second rule\n")
    config = gate.server.config.path
    assert await gate.server.reload(config)
    replies = await send(mp.postfix.port, message(marker()), rcpts=("second@example.test",))
    assert replies[2].code == 554 and "second rule" in replies[2].text, replies


# -- what ships in deploy/ ---------------------------------------------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


async def test_shipped_lines_and_config_work_together(
    postfix_factory: PostfixFactory, dns_server: DnsServer, running, tmp_path
) -> None:
    """deploy/postfix/milter.cf in main.cf, deploy/spamgate-milter.toml as spamgate's
    configuration (only its addresses changed for the test): mail is judged and
    delivered; with spamgate stopped, Postfix tells clients to try later."""
    port = free_port()
    lines = (DEPLOY / "postfix" / "milter.cf").read_text().replace("11332", str(port))
    postfix = postfix_factory(main_extra=lines)
    text = (DEPLOY / "spamgate-milter.toml").read_text()
    text = text.replace("127.0.0.1:11332", f"127.0.0.1:{port}")
    text = text.replace('nameservers = ["127.0.0.1:53"]', f'nameservers = ["{dns_server.address}"]')
    text = text.replace('listen = "127.0.0.1:9587"', 'listen = "127.0.0.1:0"')
    text = text.replace(
        'relay_domains = ["example.com", ".example.com"]', 'relay_domains = ["example.test"]'
    )
    text = text.replace('mode = "monitor"', 'mode = "enforce"')
    shutil.copytree(ROOT / "rules", tmp_path / "rules", ignore=shutil.ignore_patterns("*.toml"))
    gate = running(text)
    await gate.start()
    await gate.wait_log(r"milter listening on inet:127\.0\.0\.1")
    mark = marker()
    replies = await send(postfix.port, message(mark))
    assert replies[-1].code == 250
    raw = await asyncio.to_thread(postfix.wait_delivered, mark.encode())
    assert b"Authentication-Results: mx.example.com;" in raw
    replies = await send(postfix.port, message(marker()), rcpts=("x@elsewhere.test",))
    assert replies[2].code == 554 and "Relay access denied" in replies[2].text  # ours or Postfix's
    assert await gate.stop() == 0
    c, _ = await RawClient.connect(postfix.port, source=OUTSIDER)
    assert (await c.cmd("EHLO client.example.test")).code == 250
    assert str(await c.cmd("MAIL FROM:<a@example.org>")) == TEMPFAIL
    await c.close()
