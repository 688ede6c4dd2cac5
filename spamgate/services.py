"""Long-lived shared parts that checks and the core use: built once per process.

Unlike the configuration snapshot (`Policy`), these survive a reload: the DNS cache
stays warm, pooled connections stay open, and what the state store learned (rate
counters, greylisting, reputation) is kept. Checks receive them in `from_config`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
from dataclasses import dataclass, field

from .background import Background
from .config import Config
from .dkimverify import lower_priority
from .model import IPAddress
from .resolver import Resolver
from .settings import ConfigError
from .state import MemoryStore, StateStore, build_store
from .upstream import Upstream, build_upstream
from .upstream.maildir import MaildirUpstream

log = logging.getLogger("spamgate")


def _worker_threads() -> concurrent.futures.ThreadPoolExecutor:
    # For synchronous library code that only computes (pyspf between lookups): it
    # never waits on the network there, so two threads keep up with both cores.
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="spamgate-sync")


WORKER_NICENESS = 10


def _worker_processes(size: int) -> concurrent.futures.ProcessPoolExecutor:
    # For pure-Python work on large inputs (DKIM canonicalisation of a big message):
    # in a thread it would hold the GIL, and so the event loop, for as long as one
    # regular expression runs over the whole body. "forkserver": workers start from
    # a clean process, not a fork of this one with its threads, sockets and loop.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["spamgate.dkimverify"])
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


@dataclass
class Services:
    upstream: Upstream
    quarantine: MaildirUpstream
    resolver: Resolver
    threads: concurrent.futures.ThreadPoolExecutor = field(default_factory=_worker_threads)
    # [state] is read once at start: a reload does not switch stores.
    state: StateStore = field(default_factory=MemoryStore)
    background: Background = field(default_factory=Background)
    _processes: concurrent.futures.ProcessPoolExecutor | None = field(default=None, init=False)

    @classmethod
    def build(cls, config: Config) -> Services:
        """ConfigError listing the problems of the upstream's and the store's files."""
        problems: list[str] = []
        try:
            upstream = build_upstream(config)
        except ConfigError as exc:
            problems += exc.problems
        try:
            state = build_store(config)
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError(problems)
        return cls(
            upstream=upstream,
            quarantine=MaildirUpstream(
                config.resolve_path(config.server.quarantine), config.hostname
            ),
            resolver=Resolver(config.dns),
            state=state,
        )

    async def client_name(self, address: IPAddress) -> str:
        """The client's verified reverse name, `[UNAVAILABLE]` or `[TEMPUNAVAIL]`."""
        return await self.resolver.verified_name(address)

    def processes(self, size: int) -> concurrent.futures.ProcessPoolExecutor:
        """The worker processes, started on first use; `size` counts only then (a
        reload does not resize them). A pool whose worker died is replaced."""
        pool = self._processes
        if pool is None or getattr(pool, "_broken", False):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            pool = self._processes = _worker_processes(size)
        return pool

    async def aclose(self) -> None:
        await self.background.drain()
        await self.state.aclose()
        await self.upstream.aclose()
        await self.resolver.aclose()
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
