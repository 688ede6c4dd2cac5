"""Long-lived shared parts that checks and the core use: built once per process.

Unlike the configuration snapshot (`Policy`), these survive a reload: the DNS cache
stays warm and pooled connections stay open. Checks receive them in `from_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config
from .model import IPAddress
from .upstream import Upstream, build_upstream
from .upstream.maildir import MaildirUpstream


@dataclass
class Services:
    upstream: Upstream
    quarantine: MaildirUpstream
    resolver: Any = None  # spamgate.dns.Resolver once the DNS issue lands

    @classmethod
    def build(cls, config: Config) -> Services:
        return cls(
            upstream=build_upstream(config),
            quarantine=MaildirUpstream(
                config.resolve_path(config.server.quarantine), config.hostname
            ),
        )

    async def client_name(self, address: IPAddress) -> str:
        """The client's verified reverse name, or XCLIENT's `[UNAVAILABLE]`."""
        if self.resolver is None:
            return "[UNAVAILABLE]"
        return await self.resolver.verified_name(address)

    async def aclose(self) -> None:
        await self.upstream.aclose()
