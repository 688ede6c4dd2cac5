"""State that outlives a session: counters, first-seen times and marks with expiry.

`build_store` picks the backend from `[state]`: the in-process `MemoryStore` by
default, or the `RedisStore` when instances must share what they learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import (
    Hit,
    StateStore,
    StoreUnavailable,
    Window,
    network_of,
    unavailable_verdict,
)
from .memory import MemoryStore

if TYPE_CHECKING:
    from ..config import StateSettings


def build_store(settings: StateSettings) -> StateStore:
    if not settings.redis:
        return MemoryStore(max_keys=settings.memory_max_keys)
    from .redisstore import RedisStore

    return RedisStore(
        settings.redis,
        prefix=settings.key_prefix,
        timeout=settings.timeout,
        retry_interval=settings.retry_interval,
        policy=settings.on_unavailable,
    )


__all__ = [
    "Hit",
    "MemoryStore",
    "StateStore",
    "StoreUnavailable",
    "Window",
    "build_store",
    "network_of",
    "unavailable_verdict",
]
