"""The capture's writer thread: files rotated by size and age, compressed, pruned; a
full disk (a real ENOSPC, from /dev/full) stops it, never its caller; a writer
that falls behind drops records instead of holding them; a record that cannot be
made is dropped and said once."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import secrets
import time

import pytest

from spamgate import metrics
from spamgate.app import loads
from spamgate.capture.recorder import Capture
from spamgate.capture.settings import CaptureSettings
from spamgate.capture.writer import CaptureWriter
from tests.conftest import config_text


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def line(n: int, **more: object) -> bytes:
    return (json.dumps({"n": n, **more}) + "\n").encode()


def settings(**kw: object) -> CaptureSettings:
    return CaptureSettings(enabled=True, min_free=0, **kw)  # type: ignore[arg-type]


def files(directory) -> list[str]:
    return sorted(os.listdir(directory))


def read_all(directory) -> list[dict]:
    out = []
    for name in files(directory):
        path = os.path.join(directory, name)
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt") as fh:
            out += [json.loads(line) for line in fh]
    return out


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def test_files_rotate_by_size_and_are_compressed(tmp_path) -> None:
    w = CaptureWriter(str(tmp_path), settings(file_size=300))
    for n in range(10):
        w.submit(line(n, pad="x" * 100))
    await w.aclose()
    names = files(tmp_path)
    assert [n.endswith(".jsonl.gz") for n in names].count(True) >= 3
    assert names[-1].endswith(".jsonl")  # the last one, closed at shutdown, stays plain
    assert not [n for n in names if n.endswith(".part")]
    assert sorted(r["n"] for r in read_all(tmp_path)) == list(range(10))


async def test_files_rotate_by_age_and_the_oldest_go(tmp_path) -> None:
    clock = Clock()
    s = settings(file_age=60, total_size=400, max_age=3600)
    # Random padding: compressed files keep about their size, so the bound bites.
    w = CaptureWriter(str(tmp_path), s, clock=clock)
    for n in range(6):
        w.submit(line(n, pad=secrets.token_hex(100)))
        wait_for(lambda n=n: w.taken == n + 1 and w.size > 0)
        current = w.path
        clock.now += 61  # the file is older than file_age: the next wake rotates it
        w.wake()
        wait_for(lambda current=current: w.path != current)
    await w.aclose()
    compressed = [n for n in files(tmp_path) if n.endswith(".gz")]
    assert 1 <= len(compressed) < 6
    assert sum(os.path.getsize(tmp_path / n) for n in compressed) <= 400
    kept = [r["n"] for r in read_all(tmp_path)]
    assert kept == list(range(6 - len(kept), 6))  # the newest kept, the oldest gone

    # A file older than max_age goes, whatever its size; files not ours stay.
    old = tmp_path / "capture-20000101T000000-1-1.jsonl.gz"
    old.write_bytes(gzip.compress(b'{"n": -1}\n'))
    os.utime(old, (clock.now - 7200, clock.now - 7200))
    not_ours = tmp_path / "keep-me.txt"
    not_ours.write_text("an admin's notes")
    w = CaptureWriter(str(tmp_path), s, clock=clock)
    w.submit(line(99))
    wait_for(lambda: w.taken == 1 and w.size > 0)
    clock.now += 61
    w.wake()
    wait_for(lambda: not old.exists())
    await w.aclose()
    assert not_ours.exists()


async def test_a_full_disk_stops_the_writer_not_its_caller(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()

    def full(path: str):
        return open("/dev/full", "wb", buffering=0)  # every write: ENOSPC

    stops = value("spamgate_capture_stops_total", reason="disk_full")
    dropped = value("spamgate_capture_records_total", result="dropped")
    w = CaptureWriter(str(tmp_path), settings(), clock=clock, opener=full)
    with caplog.at_level(logging.ERROR, logger="spamgate.capture"):
        w.submit(line(1))
        wait_for(lambda: w.stopped == "disk_full")
        for n in range(2, 50):
            w.submit(line(n))  # dropped at once, never raised, never queued
    assert value("spamgate_capture_stops_total", reason="disk_full") == stops + 1
    assert value("spamgate_capture_records_total", result="dropped") == dropped + 49
    assert value("spamgate_capture_active") == 0
    assert "capture stopped (disk_full)" in caplog.text and "No space left" in caplog.text
    assert not w.pending
    # Room again: after RETRY it writes where it left off.
    w.opener = lambda path: open(path, "ab")  # noqa: SIM115 - the writer closes it
    clock.now += 61
    w.wake()
    wait_for(lambda: w.stopped is None)
    w.submit(line(50))
    await w.aclose()
    assert [r["n"] for r in read_all(tmp_path)] == [50]
    assert value("spamgate_capture_active") == 1


async def test_a_writer_that_falls_behind_drops_records(tmp_path) -> None:
    dropped = value("spamgate_capture_records_total", result="dropped")
    w = CaptureWriter(str(tmp_path), settings(queue_size=3))
    for n in range(10):
        w.submit(line(n))  # the thread's first round is 0.1 s away: three wait, seven go
    assert value("spamgate_capture_records_total", result="dropped") - dropped == 7
    await w.aclose()
    assert [r["n"] for r in read_all(tmp_path)] == [0, 1, 2]


def test_a_record_that_cannot_be_made_is_dropped_and_said_once(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    text = config_text(None, f'[capture]\nenabled = true\ndirectory = "{tmp_path}"\n')
    capture = Capture(loads(text, str(tmp_path / "c.toml")))
    dropped = value("spamgate_capture_records_total", result="dropped")
    with caplog.at_level(logging.ERROR, logger="spamgate.capture"):
        for _ in range(3):
            capture._record(object())  # type: ignore[arg-type] - not a transaction: a bug
    assert value("spamgate_capture_records_total", result="dropped") == dropped + 3
    assert caplog.text.count("a record could not be made") == 1
    assert capture.writer.thread is None  # nothing was written, nothing started


def test_aclose_without_records_is_a_no_op(tmp_path) -> None:
    w = CaptureWriter(str(tmp_path / "never"), settings())
    asyncio.run(w.aclose())
    assert not (tmp_path / "never").exists()
