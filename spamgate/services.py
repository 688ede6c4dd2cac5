"""Long-lived shared parts that checks and the core use: built once per process.

Unlike the configuration snapshot (`Policy`), these survive a reload: the DNS cache
stays warm and pooled connections stay open. Checks receive them in `from_config`.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass, field

from .config import Config
from .model import IPAddress
from .resolver import Resolver
from .upstream import Upstream, build_upstream
from .upstream.maildir import MaildirUpstream


def _worker_threads() -> concurrent.futures.ThreadPoolExecutor:
    # For synchronous library code that only computes (pyspf between lookups): it
    # never waits on the network there, so two threads keep up with both cores.
    return concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="spamgate-sync")


@dataclass
class Services:
    upstream: Upstream
    quarantine: MaildirUpstream
    resolver: Resolver
    threads: concurrent.futures.ThreadPoolExecutor = field(default_factory=_worker_threads)

    @classmethod
    def build(cls, config: Config) -> Services:
        return cls(
            upstream=build_upstream(config),
            quarantine=MaildirUpstream(
                config.resolve_path(config.server.quarantine), config.hostname
            ),
            resolver=Resolver(config.dns),
        )

    async def client_name(self, address: IPAddress) -> str:
        """The client's verified reverse name, `[UNAVAILABLE]` or `[TEMPUNAVAIL]`."""
        return await self.resolver.verified_name(address)

    async def aclose(self) -> None:
        await self.upstream.aclose()
        await self.resolver.aclose()
        self.threads.shutdown(wait=False, cancel_futures=True)
