"""The Redis state store: what several spamgate instances share.

Each operation is one Lua script or one command, so it is atomic on the server
however many instances call it at once; the scripts read the server's clock
(`TIME`), so instances need not agree on the time. Keys carry `[state] key_prefix`
and expire by themselves (PEXPIRE), so the database holds only live state.

When Redis stops answering, the first failure is logged and counted, the store is
marked down and every later call fails at once (`StoreUnavailable`, and the
`on_unavailable` policy applies in the checks) instead of each session waiting
for a timeout; a background task pings every `retry_interval` seconds and marks
the store up again when Redis answers. redis-py's pool reconnects on its own and
re-loads the scripts into a restarted server (NOSCRIPT).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from .base import SLOTS, Hit, StateStore, StoreUnavailable, Window

log = logging.getLogger("spamgate.state")

T = TypeVar("T")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: one hash per window (field = slot index, value = events in that slot).
# ARGV: for each key: window ms, limit (-1: none), cost.
# Returns {index of the first window over its limit or 0, count per window...}.
_HIT = (
    _NOW
    + f"""
local slots = {SLOTS}
local totals, curs, widths = {{}}, {{}}, {{}}
local exceeded = 0
for i, key in ipairs(KEYS) do
  local window = tonumber(ARGV[3 * i - 2])
  local limit = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local width = math.max(1, math.floor(window / slots))
  local n = math.ceil(window / width)
  local cur = math.floor(now / width)
  local total = 0
  local stale = {{}}
  local fields = redis.call('HGETALL', key)
  for j = 1, #fields, 2 do
    local slot = tonumber(fields[j])
    if slot <= cur - n or slot > cur then
      stale[#stale + 1] = fields[j]
    else
      total = total + tonumber(fields[j + 1])
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  totals[i], curs[i], widths[i] = total, cur, width
  if exceeded == 0 and limit >= 0 and total + cost > limit then exceeded = i end
end
if exceeded == 0 then
  for i, key in ipairs(KEYS) do
    local cost = tonumber(ARGV[3 * i])
    if cost > 0 then
      redis.call('HINCRBY', key, string.format('%.0f', curs[i]), cost)
      redis.call('PEXPIRE', key, tonumber(ARGV[3 * i - 2]) + widths[i])
      totals[i] = totals[i] + cost
    end
  end
end
return {{exceeded, unpack(totals)}}
"""
)

# KEYS[1]: the key; ARGV[1]: ttl ms. Returns ms since the key was first seen.
_FIRST_SEEN = (
    _NOW
    + """
local seen = redis.call('GET', KEYS[1])
if not seen then
  redis.call('SET', KEYS[1], string.format('%.0f', now), 'PX', ARGV[1])
  return 0
end
return now - tonumber(seen)
"""
)

# Failures that mean "Redis is not there": mark the store down and probe.
_OUTAGE = (RedisConnectionError, RedisTimeoutError, OSError)


class RedisStore(StateStore):
    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "spamgate:",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
        policy: str = "open",
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.retry_interval = retry_interval
        self.policy = policy
        # One quick retry on a fresh connection covers a pooled connection that a
        # restarted server closed; longer outages are the probe's business.
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._hit = self._client.register_script(_HIT)
        self._first_seen = self._client.register_script(_FIRST_SEEN)
        self._down = False
        self._probe: asyncio.Task[None] | None = None
        metrics.STATE_UP.set(1)

    @property
    def available(self) -> bool:
        return not self._down

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        if self._down:
            metrics.STATE_ERRORS.labels(op, "skipped").inc()
            raise StoreUnavailable("state store unreachable")
        started = time.perf_counter()
        try:
            return await fn()
        except _OUTAGE as exc:
            metrics.STATE_ERRORS.labels(op, "error").inc()
            self._went_down(exc)
            raise StoreUnavailable(str(exc)) from exc
        except RedisError as exc:
            # Redis answered, with an error (a full memory, a read-only replica):
            # not an outage to probe for, but no answer for this call either.
            metrics.STATE_ERRORS.labels(op, "error").inc()
            log.error("state store %s failed: %s", op, exc)
            raise StoreUnavailable(str(exc)) from exc
        finally:
            metrics.STATE_LATENCY.labels(op).observe(time.perf_counter() - started)

    def _went_down(self, exc: BaseException) -> None:
        if self._down:
            return
        self._down = True
        metrics.STATE_UP.set(0)
        log.warning(
            "state store %s unreachable (%s: %s); on_unavailable=%s; retrying every %gs",
            self._client_address(),
            type(exc).__name__,
            exc,
            self.policy,
            self.retry_interval,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            try:
                await self._client.ping()
            except (*_OUTAGE, RedisError) as exc:
                log.debug("state store still unreachable: %s", exc)
                continue
            self._down = False
            metrics.STATE_UP.set(1)
            log.info("state store %s reachable again", self._client_address())
            return

    def describe(self) -> str:
        return f"redis {self._client_address()}, keys {self.prefix}*"

    def _client_address(self) -> str:
        kw = self._client.connection_pool.connection_kwargs
        if "path" in kw:
            return f"unix:{kw['path']}"
        return f"{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"

    async def hit(self, windows: Sequence[Window]) -> Hit:
        keys = [self._key(w.key) for w in windows]
        args: list[int] = []
        for w in windows:
            args += [w.millis, -1 if w.limit is None else w.limit, w.cost]
        reply = await self._call("hit", lambda: self._hit(keys=keys, args=args))
        exceeded = int(reply[0])
        return Hit(exceeded - 1 if exceeded else None, tuple(int(c) for c in reply[1:]))

    async def first_seen(self, key: str, ttl: float) -> float:
        ms = max(1, round(ttl * 1000))
        age = await self._call(
            "first_seen", lambda: self._first_seen(keys=[self._key(key)], args=[ms])
        )
        return int(age) / 1000

    async def mark(self, key: str, ttl: float) -> None:
        ms = max(1, round(ttl * 1000))
        await self._call("mark", lambda: self._client.set(self._key(key), b"1", px=ms))

    async def marked(self, keys: Sequence[str]) -> tuple[bool, ...]:
        if not keys:
            return ()
        values = await self._call("marked", lambda: self._client.mget([self._key(k) for k in keys]))
        return tuple(v is not None for v in values)

    async def unmark(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call("unmark", lambda: self._client.delete(*[self._key(k) for k in keys]))

    async def ping(self) -> None:
        await self._call("ping", self._client.ping)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self._client.aclose()
