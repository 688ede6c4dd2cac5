"""The Redis state store: what several spamgate instances share.

Each operation is one Lua script or one command, so it is atomic on the server
however many instances call it at once; the scripts read the server's clock
(`TIME`), so instances need not agree on the time. Keys carry `[state] key_prefix`
and expire by themselves (PEXPIRE), so the database holds only live state.

Redis may be one server, the primary that Redis Sentinel names, or a Redis
Cluster (`redisclient`): redis-py follows a failover or a moved slot itself.
Every operation is bounded by `[state] timeout` in all, retries and a failover
included, so a session never waits longer than that on the store.

When Redis stops answering, the first failure is logged and counted, the store is
marked down and every later call fails at once (`StoreUnavailable`, and the
`on_unavailable` policy applies in the checks) instead of each session waiting
for a timeout; a background task pings every `retry_interval` seconds and marks
the store up again when Redis answers (through Sentinel: when a primary is
named and answers). redis-py's pool reconnects on its own and re-loads the
scripts into a restarted or newly promoted server (NOSCRIPT).

In a Cluster a script may only touch keys of one hash slot. A `hit` whose
windows lie in several slots runs one script per slot, all at once; if any of
them refuses, the others take back what they added (`_UNDO`). Each window is
still tested and counted atomically, so a quota's last unit is never taken
twice; what differs from one server is that, for the moment between the add and
the take-back, a concurrent request may see a count one request too high (and be
refused, never let through). Keys that belong together (a client's address and
network) carry a hash tag, so most hits need one script.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.asyncio.sentinel import MasterNotFoundError
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import metrics
from .base import SLOTS, Hit, StateStore, StoreUnavailable, Window
from .redisclient import Target, single_target

log = logging.getLogger("spamgate.state")

T = TypeVar("T")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: one hash per window (field = slot index, value = events in that slot).
# ARGV: for each key: window ms, limit (-1: none), cost.
# Returns {index of the first window over its limit or 0, count per window...,
# slot index counted in per window...} (the last for _UNDO).
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
local out = {{exceeded}}
for i = 1, #KEYS do out[#out + 1] = totals[i] end
for i = 1, #KEYS do out[#out + 1] = curs[i] end
return out
"""
)

# KEYS: windows a _HIT counted in; ARGV: for each, the slot index it counted in
# and the cost. Takes the events back (a Cluster hit refused in another slot).
_UNDO = """
for i, key in ipairs(KEYS) do
  local field = ARGV[2 * i - 1]
  if redis.call('HEXISTS', key, field) == 1 then
    if redis.call('HINCRBY', key, field, -tonumber(ARGV[2 * i])) <= 0 then
      redis.call('HDEL', key, field)
    end
  end
end
return 0
"""

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

# Failures that mean "Redis is not there": mark the store down and probe. The
# built-in TimeoutError (an OSError) is `[state] timeout` running out.
_OUTAGE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterDownError,
    RedisClusterException,
)


_CLIENT_REPR = re.compile(r"<redis\.asyncio\.client\.Redis\(.*?host=([^,]+),port=(\d+).*?\)>\)>\)>")


def explain(exc: BaseException, timeout: float) -> str:
    """An admin's reading of a redis-py error, for the log."""
    text = (str(exc) or type(exc).__name__).rstrip(".")
    if isinstance(exc, AuthenticationError | AuthenticationWrongNumberOfArgsError):
        return f"it refused our credentials ([state] username, password_file): {text}"
    if isinstance(exc, MasterNotFoundError):
        # redis-py names each Sentinel by the repr of its whole client
        text = _CLIENT_REPR.sub(r"sentinel \1:\2", text)
        return f"the sentinels name no usable primary: {text}"
    if isinstance(exc, TimeoutError) and not isinstance(exc, RedisError):
        return f"no answer within {timeout:g}s ([state] timeout)"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return f"its TLS certificate does not verify ([state] tls_ca_file): {text}"
    if isinstance(exc, TryAgainError) or (
        isinstance(exc, ClusterError) and "TTL exhausted" in text
    ):
        return f"its hash slot is being moved between cluster nodes; try again later: {text}"
    return f"{type(exc).__name__}: {text}"


class RedisStore(StateStore):
    kind = "redis"

    def __init__(
        self,
        target: str | Target,
        *,
        prefix: str = "spamgate:",
        timeout: float = 0.5,
        retry_interval: float = 2.0,
        policy: str = "open",
    ) -> None:
        if isinstance(target, str):  # a URL: tests and benchmarks
            target = single_target(target, timeout)
        self.target = target
        self.prefix = prefix
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.policy = policy
        client = target.client
        self._clustered = target.clustered
        self._hit = client.register_script(_HIT)
        self._undo = client.register_script(_UNDO)
        self._first_seen = client.register_script(_FIRST_SEEN)
        # MGET of keys in several slots is several commands in a Cluster.
        self._mget = client.mget_nonatomic if self._clustered else client.mget
        self._down = False
        self._probe: asyncio.Task[None] | None = None
        self._last_error: tuple[str, float] = ("", 0.0)
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
            async with asyncio.timeout(self.timeout):
                return await fn()
        except _OUTAGE as exc:
            metrics.STATE_ERRORS.labels(op, "error").inc()
            self._went_down(exc)
            raise StoreUnavailable(str(exc)) from exc
        except RedisError as exc:
            # Redis answered, with an error (a full memory, a read-only replica, a
            # command the ACL forbids, a slot in migration): not an outage to
            # probe for, but no answer for this call either.
            metrics.STATE_ERRORS.labels(op, "error").inc()
            self._log_error(op, exc)
            raise StoreUnavailable(str(exc)) from exc
        finally:
            metrics.STATE_LATENCY.labels(op).observe(time.perf_counter() - started)

    def _log_error(self, op: str, exc: BaseException) -> None:
        """Log an error answer; the same text again only after retry_interval."""
        text = explain(exc, self.timeout)
        now = time.monotonic()
        last, when = self._last_error
        if text == last and now - when < self.retry_interval:
            return
        self._last_error = (text, now)
        log.error(
            "state store %s: %s failed: %s; on_unavailable=%s",
            self.target.where(),
            op,
            text,
            self.policy,
        )

    def _went_down(self, exc: BaseException) -> None:
        if self._down:
            return
        self._down = True
        metrics.STATE_UP.set(0)
        log.warning(
            "state store %s unreachable: %s; on_unavailable=%s; retrying every %gs",
            self.target.where(),
            explain(exc, self.timeout),
            self.policy,
            self.retry_interval,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(self.retry_interval)
            try:
                async with asyncio.timeout(self.timeout):
                    await self.target.probe()
            except (*_OUTAGE, RedisError) as exc:
                log.debug("state store still unreachable: %s", explain(exc, self.timeout))
                continue
            self._down = False
            metrics.STATE_UP.set(1)
            log.info("state store %s reachable again", self.target.where())
            return

    def describe(self) -> str:
        return f"redis {self.target.describe()}, keys {self.prefix}*"

    async def hit(self, windows: Sequence[Window]) -> Hit:
        if self._clustered:
            return await self._call("hit", lambda: self._hit_slots(windows))
        reply = await self._call("hit", lambda: self._hit_script(windows))
        return _as_hit(reply, len(windows))

    async def _hit_script(self, windows: Sequence[Window]) -> list[Any]:
        args: list[int] = []
        for w in windows:
            args += [w.millis, -1 if w.limit is None else w.limit, w.cost]
        return await self._hit(keys=[self._key(w.key) for w in windows], args=args)

    async def _hit_slots(self, windows: Sequence[Window]) -> Hit:
        """A hit in a Cluster: one script per hash slot, taken back if another refuses."""
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(windows):
            groups.setdefault(key_slot(self._key(w.key).encode()), []).append(i)
        if len(groups) == 1:
            return _as_hit(await self._hit_script(windows), len(windows))
        parts = list(groups.values())
        replies = await asyncio.gather(
            *(self._hit_script([windows[i] for i in part]) for part in parts),
            return_exceptions=True,
        )
        counts = [0] * len(windows)
        refused: list[int] = []
        counted: list[tuple[list[int], list[Any]]] = []
        failure: BaseException | None = None
        for part, reply in zip(parts, replies, strict=True):
            if isinstance(reply, BaseException):
                failure = failure or reply
                continue
            exceeded = int(reply[0])
            for j, i in enumerate(part):
                counts[i] = int(reply[1 + j])
            if exceeded:
                refused.append(part[exceeded - 1])
            elif any(windows[i].cost > 0 for i in part):
                counted.append((part, reply))
        if failure is not None or refused:
            await self._take_back(windows, counted, counts)
            if failure is not None:
                raise failure
            return Hit(min(refused), tuple(counts))
        return Hit(None, tuple(counts))

    async def _take_back(
        self,
        windows: Sequence[Window],
        counted: list[tuple[list[int], list[Any]]],
        counts: list[int],
    ) -> None:
        async def undo(part: list[int], reply: list[Any]) -> None:
            n = len(part)
            keys, args = [], []
            for j, i in enumerate(part):
                if windows[i].cost > 0:
                    keys.append(self._key(windows[i].key))
                    args += [int(reply[1 + n + j]), windows[i].cost]
                    counts[i] -= windows[i].cost
            await self._undo(keys=keys, args=args)

        await asyncio.gather(*(undo(part, reply) for part, reply in counted))

    async def first_seen(self, key: str, ttl: float) -> float:
        ms = max(1, round(ttl * 1000))
        age = await self._call(
            "first_seen", lambda: self._first_seen(keys=[self._key(key)], args=[ms])
        )
        return int(age) / 1000

    async def mark(self, key: str, ttl: float) -> None:
        ms = max(1, round(ttl * 1000))
        await self._call("mark", lambda: self.target.client.set(self._key(key), b"1", px=ms))

    async def marked(self, keys: Sequence[str]) -> tuple[bool, ...]:
        if not keys:
            return ()
        values = await self._call("marked", lambda: self._mget([self._key(k) for k in keys]))
        return tuple(v is not None for v in values)

    async def unmark(self, keys: Sequence[str]) -> None:
        if keys:
            await self._call(
                "unmark", lambda: self.target.client.delete(*[self._key(k) for k in keys])
            )

    async def ping(self) -> None:
        await self._call("ping", self.target.probe)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.target.aclose()


def _as_hit(reply: list[Any], n: int) -> Hit:
    exceeded = int(reply[0])
    return Hit(exceeded - 1 if exceeded else None, tuple(int(c) for c in reply[1 : 1 + n]))
