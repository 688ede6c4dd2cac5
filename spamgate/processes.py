"""Worker processes for CPU-heavy work on large inputs (DKIM on a big message).

In a thread such work would hold the GIL, and so the event loop, for as long as
one regular expression runs over the whole body. "forkserver": workers start from
a clean process, not a fork of this one with its threads, sockets and loop, and
import only what they are told to preload; this module is what they import to
start, so it imports nothing of spamgate.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os

log = logging.getLogger("spamgate")

WORKER_NICENESS = 10


def worker_processes(size: int, preload: tuple[str, ...]) -> concurrent.futures.ProcessPoolExecutor:
    """`size` processes, each importing the `preload` modules once; started lazily
    by the executor, at a lower priority where that is allowed."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(preload))
    if not _may_lower_priority():
        return concurrent.futures.ProcessPoolExecutor(size, mp_context=context)
    return concurrent.futures.ProcessPoolExecutor(
        size, mp_context=context, initializer=lower_priority, initargs=(WORKER_NICENESS,)
    )


def _may_lower_priority() -> bool:
    """Whether this process may call setpriority(): workers then run at a lower
    priority, so that when the cores are busy the event loop, which every session
    waits on, gets them first. The shipped systemd unit forbids it
    (SystemCallFilter=~@resources: EPERM): a worker whose initializer raised
    would die, and every large message would lose its DKIM results, so the
    workers then run at the service's own priority. Asked by setting the priority
    this process already has, which changes nothing where it is allowed."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0))
    except OSError as exc:
        log.warning(
            "DKIM worker processes run at normal priority: setpriority() is not "
            "permitted here (%s; a system-call filter such as SystemCallFilter=~@resources)",
            exc.strerror,
        )
        return False
    return True


def lower_priority(increment: int) -> None:
    """A worker process's initializer: lower its scheduling priority, where that is
    allowed. An initializer that raises kills the worker, and with it the pool, so
    a system-call filter that refuses setpriority() (EPERM) must not reach here as
    an exception: the worker then runs at the priority it has."""
    with contextlib.suppress(OSError):
        os.nice(increment)
