"""The capture's writer: a thread of its own, so that no session ever waits on disk.

Records come as finished lines (`submit`: an append to a deque, nothing more);
every `BATCH` seconds the thread takes what has come, writes it to the current
file, flushes once, and keeps the directory in bounds. The thread touches no
session's objects and runs hardly any Python (the records are made on the event
loop, `recorder.Capture`): two threads working on the same objects cost more CPU
than the work itself (their reference counts travel between the cores). Then:

* a file is closed when it reaches [capture] file_size or file_age, then
  compressed (`NAME.jsonl.gz`, written beside it and renamed into place, so a
  reader never sees half a compressed file) and the plain one removed;
* the oldest compressed files go when all files together exceed total_size, and
  any file of ours older than max_age goes (a plain one only then: it may be
  another worker's current file);
* below min_free bytes free on the file system, and on any write error (ENOSPC:
  the disk is full), it stops writing: one log line, spamgate_capture_active 0,
  spamgate_capture_stops_total{reason}; records are dropped (and counted) while
  it is stopped, and every `RETRY` seconds it tries again. The mail never waits
  for any of it, and never fails because of it.

What waits is bounded ([capture] queue_size): when the writer falls behind,
records are dropped and counted, not kept in memory without limit.

File names: `capture-YYYYMMDDTHHMMSS-PID-N.jsonl` (UTC), one writer per process,
so worker processes share a directory without sharing a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gzip
import itertools
import logging
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import metrics
from .settings import CaptureSettings

log = logging.getLogger("spamgate.capture")

RETRY = 60.0  # seconds between attempts to write again after a stop
FREE_CHECK = 10.0  # seconds between checks of the free space
BATCH = 0.1  # seconds between the writer's rounds (what came meanwhile is written, flushed)
NAME = re.compile(r"^capture-\d{8}T\d{6}-\d+-\d+\.jsonl(\.gz)?$")


class CaptureWriter:
    def __init__(
        self,
        directory: str,
        settings: CaptureSettings,
        *,
        clock: Callable[[], float] = time.time,
        opener: Callable[[str], Any] | None = None,
    ) -> None:
        self.directory = directory
        self.settings = settings
        self.clock = clock
        # How a capture file is opened (binary, append); a test hands /dev/full.
        self.opener = opener or (lambda path: open(path, "ab", buffering=65536))  # noqa: SIM115
        self.pending: deque[bytes] = deque()  # appended by the loop, taken by the thread
        self.taken = 0  # records taken (the thread's count)
        self.writing = True  # False while stopped: records are dropped at once
        self._wake = threading.Event()
        self._closing = False
        self.thread: threading.Thread | None = None
        self.file: Any = None
        self.path = ""
        self.size = 0
        self.opened = 0.0
        self.serial = itertools.count(1)
        self.stopped: str | None = None  # the reason, while stopped
        self._retry_at = 0.0
        self._free_at = 0.0

    # -- the event loop's side ---------------------------------------------------------

    @property
    def accepting(self) -> bool:
        """Would a record be taken now (not stopped, not too far behind)?"""
        return self.writing and len(self.pending) < self.settings.queue_size

    def submit(self, line: bytes) -> None:
        """Queue one record's line; never blocks, never raises."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="spamgate-capture", daemon=True)
            self.thread.start()
        if not self.accepting:
            metrics.CAPTURE_RECORDS.labels("dropped").inc()
            return
        self.pending.append(line)

    def submit_many(self, lines: list[bytes]) -> None:
        """Queue several records' lines (the loop's side keeps within queue_size)."""
        if self.thread is None:
            self.submit(lines[0])
            lines = lines[1:]
        if not self.writing:
            metrics.CAPTURE_RECORDS.labels("dropped").inc(len(lines))
            return
        self.pending.extend(lines)

    def wake(self) -> None:
        """Start the thread's next round now (tests; shutdown)."""
        self._wake.set()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Write what is waiting, close the current file (left uncompressed: it is
        complete, and readers take plain files too)."""
        thread = self.thread
        if thread is None:
            return
        self._closing = True
        self._wake.set()
        await asyncio.to_thread(thread.join, timeout)

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        self._open()
        while True:
            self._wake.wait(BATCH)
            self._wake.clear()
            closing = self._closing
            batch = []
            while self.pending:
                batch.append(self.pending.popleft())
            self.taken += len(batch)
            now = self.clock()
            if self.file is None and now >= self._retry_at:
                self._open()
            written = size = 0
            for n, item in enumerate(batch):
                if self.file is None:  # stopped: the rest of the batch is lost too
                    metrics.CAPTURE_RECORDS.labels("dropped").inc(len(batch) - n)
                    break
                wrote = self._write(item)
                if wrote:
                    written, size = written + 1, size + wrote
                if self.file is not None:
                    self._maintain(now)  # a file full of this batch rotates at once
            if written:  # counted once a round, not once a record
                metrics.CAPTURE_RECORDS.labels("written").inc(written)
                metrics.CAPTURE_BYTES.inc(size)
            if self.file is not None and batch:
                self._flush()
            if self.file is not None:
                self._maintain(now)
            if closing:
                break
        self._close_file()

    def _write(self, data: bytes) -> int:
        """Write one record's line; its size in bytes, 0 if it was dropped."""
        try:
            self.file.write(data)
        except OSError as exc:
            metrics.CAPTURE_RECORDS.labels("dropped").inc()
            self._failed(exc)
            return 0
        self.size += len(data)
        return len(data)

    def _flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:
            self._failed(exc)

    def _maintain(self, now: float) -> None:
        s = self.settings
        if self.size >= s.file_size or now - self.opened >= s.file_age:
            self._rotate()
            return
        if now >= self._free_at:
            self._free_at = now + FREE_CHECK
            short = self._short_of_space()
            if short:
                self._stop("min_free", short)

    def _failed(self, exc: OSError) -> None:
        reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "error"
        self._stop(reason, f"{self.path}: {exc.strerror or exc}")

    def stop(self, reason: str, detail: str) -> None:
        """Stop for good, from the event loop's side (the redaction key cannot be
        read: records cannot be made until it is fixed and spamgate restarted)."""
        self.writing = False
        self.stopped = reason
        metrics.CAPTURE_ACTIVE.set(0)
        metrics.CAPTURE_STOPS.labels(reason).inc()
        log.error(
            "capture stopped (%s): %s; mail is not affected; fix it and restart", reason, detail
        )

    def _stop(self, reason: str, detail: str) -> None:
        """Stop writing (the mail goes on): say so once, in the log and the metrics."""
        self.writing = False
        self.stopped = reason
        self._retry_at = self.clock() + RETRY
        self._close_file(quiet=True)
        metrics.CAPTURE_ACTIVE.set(0)
        metrics.CAPTURE_STOPS.labels(reason).inc()
        log.error(
            "capture stopped (%s): %s; mail is not affected, records are dropped; "
            "trying again every %.0fs",
            reason,
            detail,
            RETRY,
        )

    def _short_of_space(self) -> str | None:
        try:
            st = os.statvfs(self.directory)
        except OSError as exc:
            return f"{self.directory}: {exc.strerror}"
        free = st.f_bavail * st.f_frsize
        if free < self.settings.min_free:
            return f"{self.directory}: {free} bytes free, min_free is {self.settings.min_free}"
        return None

    def _open(self) -> None:
        """Start a new file (after a stop too, if there is room now)."""
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            self._stop_once("error", f"{self.directory}: {exc.strerror}")
            return
        short = self._short_of_space()
        if short:
            self._stop_once("min_free", short)
            return
        now = self.clock()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
        path = os.path.join(
            self.directory, f"capture-{stamp}-{os.getpid()}-{next(self.serial)}.jsonl"
        )
        try:
            self.file = self.opener(path)
        except OSError as exc:
            self.path = path
            self._failed_once(exc)
            return
        self.path, self.size, self.opened = path, 0, now
        self._free_at = now + FREE_CHECK
        if self.stopped is not None:
            log.warning("capture resumed: writing %s", path)
        self.stopped = None
        self.writing = True
        metrics.CAPTURE_ACTIVE.set(1)

    def _stop_once(self, reason: str, detail: str) -> None:
        """A retry that fails again stays stopped quietly (one line per stop)."""
        if self.stopped is None:
            self._stop(reason, detail)
        else:
            self._retry_at = self.clock() + RETRY

    def _failed_once(self, exc: OSError) -> None:
        if self.stopped is None:
            self._failed(exc)
        else:
            self._retry_at = self.clock() + RETRY

    def _close_file(self, *, quiet: bool = False) -> None:
        f, self.file = self.file, None
        if f is None:
            return
        try:
            f.close()
        except OSError as exc:
            if not quiet:
                self._failed(exc)

    def _rotate(self) -> None:
        """Close the current file, compress it, keep the directory in bounds, go on
        with a new one."""
        path = self.path
        self._close_file()
        if self.stopped is not None:  # the close itself failed
            return
        self._compress(path)
        if self.stopped is not None:
            return
        self._prune()
        self._open()

    def _compress(self, path: str) -> None:
        target, part = path + ".gz", path + ".gz.part"
        try:
            with (
                open(path, "rb") as src,
                open(part, "wb") as raw,
                gzip.GzipFile(
                    filename=os.path.basename(path),
                    mode="wb",
                    compresslevel=self.settings.compress_level,
                    fileobj=raw,
                ) as out,
            ):
                shutil.copyfileobj(src, out, 1024 * 1024)
            os.replace(part, target)
            os.unlink(path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(part)
            self._failed(exc)  # the plain file stays, complete

    def _prune(self) -> None:
        """Delete our oldest files beyond total_size, and any older than max_age."""
        s = self.settings
        now = self.clock()
        files = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if not NAME.match(name):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            files.append((st.st_mtime, path, st.st_size, name.endswith(".gz")))
        files.sort()
        total = sum(f[2] for f in files)
        for mtime, path, size, compressed in files:
            old = now - mtime > s.max_age
            if old or (compressed and total > s.total_size):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    total -= size
