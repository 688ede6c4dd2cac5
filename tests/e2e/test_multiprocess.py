"""Several worker processes, one scrape: the sum over all of them (tests/e2e/mpharness.py)."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import config_text

ROOT = pathlib.Path(__file__).resolve().parents[2]
BODY = b"Subject: hi\r\n\r\nhello\r\n"


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def deliver(port: int, n: int) -> None:
    for i in range(n):
        c, _ = await RawClient.connect(port)
        replies = await c.mail(f"s{i}@example.org", ["u@example.test"], BODY)
        assert replies[-1].code == 250
        await c.cmd("QUIT")
        await c.close()


async def test_scrape_sums_workers(sink: Sink, tmp_path) -> None:
    config = tmp_path / "spamgate.toml"
    config.write_text(config_text(sink))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.mpharness",
        str(config),
        str(tmp_path / "prom"),
        "2",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    workers: list[tuple[int, int]] = []
    open_sessions: list[RawClient] = []
    try:
        async with asyncio.timeout(20):
            while True:
                word, *rest = (await proc.stdout.readline()).decode().split()
                if word == "worker":
                    workers.append((int(rest[0]), int(rest[1])))
                elif word == "metrics":
                    metrics_port = int(rest[0])
                    break
        assert len(workers) == 2 and workers[0][1] != workers[1][1]
        (_, port_a), (pid_b, port_b) = workers

        await deliver(port_a, 3)
        await deliver(port_b, 4)
        for port, n in ((port_a, 1), (port_b, 2)):
            for _ in range(n):
                c, _ = await RawClient.connect(port)
                assert (await c.cmd("EHLO c.test")).code == 250
                open_sessions.append(c)

        s = await asyncio.to_thread(scrape, metrics_port)
        assert get(s, "spamgate_sessions_total", frontend="proxy") == 3 + 4 + 3
        assert get(s, "spamgate_transactions_total", frontend="proxy", outcome="accepted") == 7
        assert get(s, "spamgate_message_size_bytes_count") == 7
        assert get(s, "spamgate_message_size_bytes_bucket", le="1024.0") == 7
        assert get(s, "spamgate_sessions_active", frontend="proxy") == 3
        assert get(s, "spamgate_config_last_reload_success") == 1
        assert get(s, "spamgate_upstream_up") == 1
        assert len(sink.messages) == 7
        # one series per label set, not one per process
        info = [k for k in s if k[0] == "spamgate_config_info"]
        assert len(info) == 1 and s[info[0]] == 1
        assert len([k for k in s if k[0] == "spamgate_build_info"]) == 1
        assert not any(dict(k[1]).get("pid") for k in s)

        os.kill(pid_b, signal.SIGKILL)  # a crash, with two sessions open
        async with asyncio.timeout(10):
            while (await proc.stdout.readline()).decode().split() != ["exited", str(pid_b)]:
                pass
        s = await asyncio.to_thread(scrape, metrics_port)
        # the dead worker's sessions are gone
        assert get(s, "spamgate_sessions_active", frontend="proxy") == 1
        assert get(s, "spamgate_sessions_total", frontend="proxy") == 10  # its counts are not
        assert get(s, "spamgate_transactions_total", frontend="proxy", outcome="accepted") == 7
    finally:
        for c in open_sessions:
            await c.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
    assert proc.returncode == 0
    assert not (tmp_path / "prom").exists()  # the parent removed the per-process files
