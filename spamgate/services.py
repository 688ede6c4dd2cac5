"""What checks may use, long-lived: DNS, the state store, worker threads and processes.

Unlike the configuration snapshot (`Policy`), these survive a reload: the DNS cache
stays warm and what the state store learned (rate counters, greylisting,
reputation) is kept. Checks receive them in `from_config`. The resolver and the
store are interfaces (`resolver.Resolver`, `state.StateStore`): the composition
root (`app.build`) may be handed others, a throwaway store for `spamgate explain`,
recorded answers for a replay. The upstream and what the session driver needs are
the application's, not the checks' (`app.App`).
"""

from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import dataclass, field

from .config import Config
from .processes import worker_processes
from .resolver import DnsResolver, Resolver
from .state import MemoryStore, StateStore, build_store

log = logging.getLogger("spamgate")


# What the worker processes import before their first task: the DKIM verifier,
# the one user of the pool (by name: nothing of it is imported here).
PRELOAD = ("spamgate.checks.engines.dkimverify",)


def _worker_threads() -> concurrent.futures.ThreadPoolExecutor:
    # For synchronous library code that only computes (pyspf between lookups): it
    # never waits on the network there, so two threads keep up with both cores.
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="spamgate-sync")


@dataclass
class Services:
    resolver: Resolver
    # [state] is read once at start: a reload does not switch stores.
    state: StateStore = field(default_factory=MemoryStore)
    threads: concurrent.futures.ThreadPoolExecutor = field(default_factory=_worker_threads)
    _processes: concurrent.futures.ProcessPoolExecutor | None = field(default=None, init=False)

    @classmethod
    def build(cls, config: Config) -> Services:
        """The resolver of [dns] and the store of [state]; ConfigError for the
        store's unreadable files (a password, a CA)."""
        return cls(resolver=DnsResolver(config.dns), state=build_store(config))

    def processes(self, size: int) -> concurrent.futures.ProcessPoolExecutor:
        """The worker processes, started on first use; `size` counts only then (a
        reload does not resize them). A pool whose worker died is replaced."""
        pool = self._processes
        if pool is None or getattr(pool, "_broken", False):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            pool = self._processes = worker_processes(size, PRELOAD)
        return pool

    async def aclose(self) -> None:
        await self.state.aclose()
        await self.resolver.aclose()
        self.threads.shutdown(wait=False, cancel_futures=True)
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
