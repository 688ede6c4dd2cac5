"""Running out of file descriptors: say 421 to new clients, and recover by itself.

Each session holds one descriptor for its client and one for its upstream, and DNS
lookups take more for a moment. Two defences, so that the limit (`ulimit -n`) is
met by a `421 4.3.2` and never by silence or a failed upstream connection:

* a watermark (`watermark`): a client whose socket lands on a descriptor number
  past it is refused at once (the session layer does it, on any event loop);
* a reserve descriptor (`FdReserve`), for when the limit is hit anyway (other
  descriptors: upstream connections, DNS, spool files). accept() then fails with
  EMFILE; asyncio logs an error, stops accepting for a second and tries again,
  while the clients that connected meanwhile wait without a word. Like the
  classic trick (libuv, nginx), spamgate closes the reserve, accepts each waiting
  client with it, says 421 and closes, then takes the reserve back. (uvloop does
  the same inside libuv, but closes without a 421.) As sessions end, descriptors
  come back and accept() works again on asyncio's own retry.

At start the soft limit is raised to the hard one (systemd's default soft limit
is 1024, its hard limit far higher; spamgate uses epoll, never select()), and a
limit that cannot hold `max_sessions` is reported.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import metrics

log = logging.getLogger("spamgate")

# Descriptors per session (client and upstream) and for the process itself.
PER_SESSION = 2
BASE = 64
# Clients refused per accept() failure, at most: the event loop must move on.
MAX_REFUSALS = 256
_CAP = 1 << 20  # a soft limit for RLIM_INFINITY (the kernel's default nr_open)


def watermark(soft: int) -> int:
    """The descriptor number from which new clients are refused with 421.

    accept() returns the lowest free descriptor, so a client on descriptor N
    means N others are open. Refusing from half of what is left after a margin
    (for DNS queries, spool files, the process's own) leaves every admitted
    session room for its upstream connection: the limit is then met by a 421 at
    connect, on any event loop, rather than by a failed upstream connection.
    """
    return (soft - min(BASE, soft // 4)) // 2


def raise_soft_limit(max_sessions: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard one; warn if it is too low.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
    needed = max_sessions * PER_SESSION + BASE
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open file limit %d is below what max_sessions %d may need (%d): clients beyond "
            "it get 421; raise LimitNOFILE (ulimit -n) or lower [limits] max_sessions",
            soft,
            max_sessions,
            needed,
        )
    return _CAP if soft == resource.RLIM_INFINITY else soft


class FdReserve:
    """One spare descriptor, spent to tell waiting clients 421 when accept() fails."""

    def __init__(self, greeting: Callable[[], bytes]) -> None:
        self._greeting = greeting
        self._fd: int | None = None
        self._listening: set[int] = set()
        self._previous: Any = None
        self._last_log = 0.0
        self.refused = 0
        self._take()

    def _take(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = None  # none to spare now; taken again after the next refusal

    def install(self, loop: asyncio.AbstractEventLoop, sockets: Iterable[Any]) -> None:
        """Watch these listening sockets for accept() running out of descriptors."""
        self._listening.update(s.fileno() for s in sockets)
        if self._previous is None:
            self._previous = loop.get_exception_handler() or False
            loop.set_exception_handler(self._handle)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _handle(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        sock = context.get("socket")
        fd = sock.fileno() if sock is not None else -1
        if (
            fd not in self._listening
            or not isinstance(exc, OSError)
            or exc.errno not in (errno.EMFILE, errno.ENFILE)
        ):
            if self._previous:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        refused = self._refuse_waiting(fd)
        self.refused += refused
        metrics.SESSIONS_REFUSED.labels("fd_limit").inc(refused)
        now = time.monotonic()
        if now - self._last_log >= 10:  # one line per ten seconds, not one per client
            self._last_log = now
            log.warning(
                "out of file descriptors (%s): %d clients told 421 so far; accepting again "
                "as sessions end",
                os.strerror(exc.errno or 0),
                self.refused,
            )

    def _refuse_waiting(self, fd: int) -> int:
        """Accept each waiting client on the spare descriptor, say 421, close."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        refused = 0
        # A second socket object on the listener's own descriptor (asyncio only
        # hands out a wrapper without accept()); detached, never closed, below.
        listening = socket.socket(fileno=fd)
        try:
            for _ in range(MAX_REFUSALS):
                try:
                    conn, _addr = listening.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break  # nobody else waiting
                except OSError:
                    break  # still none to spare (another part took it)
                with conn:
                    conn.setblocking(False)
                    try:
                        conn.send(self._greeting())
                        conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                refused += 1
        finally:
            listening.detach()
            self._take()
        return refused
