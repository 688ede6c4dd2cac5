"""Reloading rules: SIGHUP and file changes, good and broken files, sessions in flight."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import signal
import sys
import time

from tests.kit.ports import free_port
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory, sample

ROOT_DIR = pathlib.Path(__file__).resolve().parents[2]
RULES = '[rules]\nrecipient = ["hash:recipient"]\n'


async def rcpt_code(gate, address: str = "u@example.test") -> int:
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    code = (await c.cmd(f"RCPT TO:<{address}>")).code
    await c.cmd("QUIT")
    await c.close()
    return code


async def eventually(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(0.05)
    return False


def bump(path) -> None:
    """Make sure a rewrite is seen even on coarse-mtime file systems."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def test_reload_good_then_broken_while_a_session_is_open(
    gate_factory: GateFactory, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO)
    table = tmp_path / "recipient"
    table.write_text("# nobody refused yet\n")
    gate = await gate_factory(RULES, server={"reload_interval": "0"})
    path = gate.server.config.path
    # a session that started on the old rules ...
    old, _ = await gate.client()
    await old.cmd("EHLO c.test")
    await old.cmd("MAIL FROM:<a@example.org>")

    table.write_text("u@example.test REJECT\n")
    assert await gate.server.reload(path)
    assert sample("spamgate_config_last_reload_success") == 1
    # ... finishes on them; new sessions get the new ones
    assert (await old.cmd("RCPT TO:<u@example.test>")).code == 250
    assert await rcpt_code(gate) == 554

    failures = sample("spamgate_config_reloads_total", result="failure")
    table.write_text("u@example.test REJECT\nv@example.test REJCT\n")
    assert not await gate.server.reload(path)
    assert sample("spamgate_config_last_reload_success") == 0
    assert sample("spamgate_config_reloads_total", result="failure") == failures + 1
    problem = f"{table}:2: unknown action 'REJCT'"
    assert any(problem in p for p in gate.server.runtime.reload_problems)
    assert f"reload refused: {problem}" in caplog.text
    # the running rules stay: u is still refused, v still accepted
    assert await rcpt_code(gate) == 554
    assert await rcpt_code(gate, "v@example.test") == 250
    assert (await old.cmd("RCPT TO:<v@example.test>")).code == 250

    table.write_text("v@example.test REJECT\n")
    assert await gate.server.reload(path)
    assert sample("spamgate_config_last_reload_success") == 1
    assert gate.server.runtime.reload_problems == []
    assert await rcpt_code(gate) == 250
    assert await rcpt_code(gate, "v@example.test") == 554


async def test_a_changed_rule_file_is_reloaded(gate_factory: GateFactory, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO)
    table = tmp_path / "recipient"
    table.write_text("# empty\n")
    gate = await gate_factory(RULES, server={"reload_interval": "0.05"})
    assert await rcpt_code(gate) == 250

    table.write_text("u@example.test 550 Gone\n")
    bump(table)
    assert await eventually(lambda: _is(gate, 550))
    assert "reloaded configuration" in caplog.text and "changed: " in caplog.text

    # a broken edit is refused once, and the rules in force stay
    failures = sample("spamgate_config_reloads_total", result="failure")
    table.write_text("u@example.test 250 fine\n")
    bump(table)

    async def refused() -> bool:
        return sample("spamgate_config_last_reload_success") == 0

    assert await eventually(refused)
    await asyncio.sleep(0.3)  # several more polls: not retried while nothing changes
    assert sample("spamgate_config_reloads_total", result="failure") == failures + 1
    assert "recipient:1: reply code 250 is not 4NN or 5NN" in caplog.text
    assert await rcpt_code(gate) == 550


async def test_a_table_named_before_it_exists_is_picked_up(
    gate_factory: GateFactory, tmp_path
) -> None:
    (tmp_path / "recipient").write_text("# empty\n")
    gate = await gate_factory(RULES, server={"reload_interval": "0.05"})
    config = tmp_path / "spamgate-0.toml"
    config.write_text(
        config.read_text().replace('"hash:recipient"', '"hash:recipient", "hash:new"')
    )
    bump(config)

    async def refused() -> bool:
        return sample("spamgate_config_last_reload_success") == 0

    assert await eventually(refused)  # hash:new does not exist yet
    assert any(
        f"[rules] recipient: {tmp_path}/new: no such file" in p
        for p in gate.server.runtime.reload_problems
    )
    (tmp_path / "new").write_text("u@example.test DEFER\n")
    assert await eventually(lambda: _is(gate, 450))


async def _is(gate, code: int) -> bool:
    return await rcpt_code(gate) == code


async def test_sighup_reloads(tmp_path, sink) -> None:
    port = free_port()
    (tmp_path / "recipient").write_text("# empty\n")
    cfg = tmp_path / "spamgate.toml"
    cfg.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.test"\n'
        'relay_domains = ["example.test"]\nreload_interval = 0\n'
        f'[upstream]\naddress = "{sink.address}"\n[dns]\nreverse_lookup = false\n' + RULES
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "spamgate",
        "run",
        "-c",
        str(cfg),
        cwd=ROOT_DIR,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None

    async def wait_for(text: str) -> str:
        async with asyncio.timeout(15):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "spamgate exited"
                if text in line:
                    return line

    try:
        await wait_for("listening on")

        async def code() -> int:
            c, _ = await RawClient.connect(port)
            await c.cmd("EHLO c.test")
            await c.cmd("MAIL FROM:<a@example.org>")
            r = (await c.cmd("RCPT TO:<u@example.test>")).code
            await c.close()
            return r

        assert await code() == 250
        (tmp_path / "recipient").write_text("u@example.test REJECT\n")
        proc.send_signal(signal.SIGHUP)
        line = await wait_for("reloaded configuration")
        assert "SIGHUP" in line
        assert await code() == 554
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            await proc.wait()
