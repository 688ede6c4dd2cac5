"""The capture's writer thread: files rotated by size and age, compressed, pruned; a
full disk (a real ENOSPC, from /dev/full) stops it, never its caller; a writer
that falls behind drops records instead of holding them."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import secrets
import threading
import time

import pytest

from spamgate import metrics
from spamgate.capture.settings import CaptureSettings
from spamgate.capture.writer import CaptureWriter


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


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
    w = CaptureWriter(str(tmp_path), settings(file_size=300), lambda n: {"n": n, "pad": "x" * 100})
    for n in range(10):
        w.submit(n)
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
    w = CaptureWriter(
        str(tmp_path), s, lambda n: {"n": n, "pad": secrets.token_hex(100)}, clock=clock
    )
    for n in range(6):
        w.submit(n)
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
    w = CaptureWriter(str(tmp_path), s, lambda n: {"n": n}, clock=clock)
    w.submit(99)
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
    w = CaptureWriter(str(tmp_path), settings(), lambda n: {"n": n}, clock=clock, opener=full)
    with caplog.at_level(logging.ERROR, logger="spamgate.capture"):
        w.submit(1)
        wait_for(lambda: w.stopped == "disk_full")
        for n in range(2, 50):
            w.submit(n)  # dropped at once, never raised, never queued
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
    w.submit(50)
    await w.aclose()
    assert [r["n"] for r in read_all(tmp_path)] == [50]
    assert value("spamgate_capture_active") == 1


async def test_a_writer_that_falls_behind_drops_records(tmp_path) -> None:
    gate = threading.Event()

    def slow(n: int) -> dict:
        gate.wait(5)
        return {"n": n}

    dropped = value("spamgate_capture_records_total", result="dropped")
    w = CaptureWriter(str(tmp_path), settings(queue_size=3), slow)
    for n in range(10):
        w.submit(n)  # the first waits in the thread, three are queued, six dropped
    assert value("spamgate_capture_records_total", result="dropped") - dropped >= 6
    gate.set()
    await w.aclose()
    assert 3 <= len(read_all(tmp_path)) <= 4


async def test_a_record_that_cannot_be_made_is_dropped_once_logged(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(n: int) -> dict:
        if n % 2:
            raise ValueError("a bug")
        return {"n": n}

    w = CaptureWriter(str(tmp_path), settings(), broken)
    with caplog.at_level(logging.ERROR, logger="spamgate.capture"):
        for n in range(6):
            w.submit(n)
        await w.aclose()
    assert [r["n"] for r in read_all(tmp_path)] == [0, 2, 4]
    assert caplog.text.count("a record could not be made") == 1


def test_aclose_without_records_is_a_no_op(tmp_path) -> None:
    w = CaptureWriter(str(tmp_path / "never"), settings(), lambda n: {})
    asyncio.run(w.aclose())
    assert not (tmp_path / "never").exists()
