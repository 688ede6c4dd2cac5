"""Long-lived shared parts that checks and the core use: built once per process.

Unlike the configuration snapshot (`Policy`), these survive a reload: the DNS cache
stays warm, pooled connections stay open, and what the state store learned (rate
counters, greylisting, reputation) is kept. Checks receive them in `from_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .background import Background
from .config import Config
from .model import IPAddress
from .state import MemoryStore, StateStore, build_store
from .upstream import Upstream, build_upstream
from .upstream.maildir import MaildirUpstream


@dataclass
class Services:
    upstream: Upstream
    quarantine: MaildirUpstream
    resolver: Any = None  # spamgate.dns.Resolver once the DNS issue lands
    # [state] is read once at start: a reload does not switch stores.
    state: StateStore = field(default_factory=MemoryStore)
    background: Background = field(default_factory=Background)

    @classmethod
    def build(cls, config: Config) -> Services:
        return cls(
            upstream=build_upstream(config),
            quarantine=MaildirUpstream(
                config.resolve_path(config.server.quarantine), config.hostname
            ),
            state=build_store(config.state),
        )

    async def client_name(self, address: IPAddress) -> str:
        """The client's verified reverse name, or XCLIENT's `[UNAVAILABLE]`."""
        if self.resolver is None:
            return "[UNAVAILABLE]"
        return await self.resolver.verified_name(address)

    async def aclose(self) -> None:
        await self.background.drain()
        await self.state.aclose()
        await self.upstream.aclose()
