"""State that outlives a session: counters, first-seen times and marks with expiry.

`build_store` picks the backend from `[state]`: the in-process `MemoryStore` by
default, or the `RedisStore` when instances must share what they learn (one
Redis, a Sentinel-managed primary or a Cluster).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Hit,
    StateStore,
    StoreUnavailable,
    Window,
    network_of,
)
from .memory import MemoryStore

if TYPE_CHECKING:
    from ..config import Config


def build_store(config: Config) -> StateStore:
    """The store [state] asks for; ConfigError if a password or TLS file is unreadable."""
    settings = config.state
    if not settings.shared:
        return MemoryStore(max_keys=settings.memory_max_keys)
    from .redisclient import open_target
    from .redisstore import RedisStore

    return RedisStore(
        open_target(config),
        prefix=settings.key_prefix,
        timeout=settings.timeout,
        retry_interval=settings.retry_interval,
        policy=settings.on_unavailable,
    )


def state_warnings(config: Config) -> list[str]:
    """`file:line: warning: ...` for [state] (a password written in the file)."""
    if not config.state.shared:
        return []
    from .redisclient import config_warnings

    return config_warnings(config)


__all__ = [
    "Hit",
    "MemoryStore",
    "StateStore",
    "StoreUnavailable",
    "Window",
    "build_store",
    "network_of",
    "state_warnings",
]
