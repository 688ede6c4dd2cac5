"""The state store's operations, against the in-process store and a real Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from spamgate.state import MemoryStore, StateStore, StoreUnavailable, Window
from spamgate.state.base import SLOTS
from spamgate.state.redisstore import RedisStore
from tests.kit.redisserver import ClusterSet, RedisServer, SentinelSet

from ..conftest import sample


def redis_store(server: RedisServer | SentinelSet | ClusterSet, **kw: object) -> RedisStore:
    """A store on one server, the primary Sentinels name or a Cluster; a prefix of its own."""
    from spamgate.app import loads
    from spamgate.state.redisclient import Credentials, connect

    timeout = float(kw.get("timeout", 0.5))  # type: ignore[arg-type]
    settings = loads("[state]\n" + "\n".join(server.state_lines())).state
    target = connect(settings, Credentials(), timeout)
    return RedisStore(target, prefix=f"t-{uuid.uuid4().hex[:12]}:", **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[StateStore]:
    if request.param == "memory":
        s: StateStore = MemoryStore()
    else:
        fixture = {"redis": "redis_server", "sentinel": "sentinel_set", "cluster": "redis_cluster"}
        s = redis_store(request.getfixturevalue(fixture[request.param]))
    yield s
    await s.aclose()


async def test_hit_counts_up_to_the_limit_and_not_past_it(store: StateStore) -> None:
    w = Window("a", 60, limit=3)
    results = [await store.hit([w]) for _ in range(5)]
    assert [r.allowed for r in results] == [True, True, True, False, False]
    assert [r.counts for r in results] == [(1,), (2,), (3,), (3,), (3,)]  # refusals not counted
    assert (await store.hit([Window("a", 60, cost=0)])).counts == (3,)  # a read
    assert (await store.hit([Window("b", 60, limit=3)])).counts == (1,)  # keys are apart


async def test_hit_is_all_or_nothing(store: StateStore) -> None:
    assert (await store.hit([Window("full", 60, limit=1)])).allowed
    hit = await store.hit([Window("free", 60, limit=5), Window("full", 60, limit=1)])
    assert hit.exceeded == 1
    assert hit.counts == (0, 1)
    # the window that had room was not counted either
    assert (await store.hit([Window("free", 60, cost=0)])).counts == (0,)
    hit = await store.hit([Window("free", 60, limit=5, cost=2), Window("other", 60)])
    assert hit.allowed and hit.counts == (2, 1)


async def test_unlimited_window_only_counts(store: StateStore) -> None:
    for _ in range(3):
        hit = await store.hit([Window("learn", 60)])
    assert hit.allowed and hit.counts == (3,)


async def test_window_slides(store: StateStore) -> None:
    """Events leave the window one by one as they age, not all at a boundary."""
    w = Window("slide", 1.0, limit=4)
    for _ in range(2):
        assert (await store.hit([w])).allowed
    await asyncio.sleep(0.6)
    for _ in range(2):
        assert (await store.hit([w])).allowed
    assert not (await store.hit([w])).allowed
    await asyncio.sleep(0.5)  # the first two are now older than the window; the others not
    assert (await store.hit([w])).counts == (3,)
    assert (await store.hit([w])).counts == (4,)
    assert not (await store.hit([w])).allowed


async def test_first_seen(store: StateStore) -> None:
    assert await store.first_seen("t", ttl=0.4) == 0.0
    await asyncio.sleep(0.1)
    age = await store.first_seen("t", ttl=0.4)
    assert 0.08 <= age < 0.4
    await asyncio.sleep(0.1)
    assert await store.first_seen("t", ttl=0.4) > age  # the first time is kept
    await asyncio.sleep(0.3)
    assert await store.first_seen("t", ttl=0.4) == 0.0  # expired: new again


async def test_marks(store: StateStore) -> None:
    assert await store.marked(["m1", "m2"]) == (False, False)
    await store.mark("m1", 0.3)
    await store.mark("m2", 60)
    assert await store.marked(["m1", "m2", "m3"]) == (True, True, False)
    await store.unmark(["m2"])
    assert await store.marked(["m2"]) == (False,)
    await asyncio.sleep(0.35)
    assert await store.marked(["m1"]) == (False,)
    assert await store.marked([]) == ()


async def test_concurrent_hits_never_overshoot(store: StateStore) -> None:
    w = Window("race", 60, limit=10)
    results = await asyncio.gather(*(store.hit([w]) for _ in range(40)))
    assert sum(r.allowed for r in results) == 10


async def test_two_redis_clients_share_one_quota(redis_server: RedisServer) -> None:
    """Two instances (two clients, two pools) racing for the last units of a quota."""
    prefix = f"t-{uuid.uuid4().hex[:12]}:"
    a, b = (RedisStore(redis_server.url, prefix=prefix) for _ in range(2))
    w = Window("shared", 60, limit=25)
    results = await asyncio.gather(*(s.hit([w]) for _ in range(20) for s in (a, b)))
    assert sum(r.allowed for r in results) == 25
    assert (await a.hit([Window("shared", 60, cost=0)])).counts == (25,)
    await a.aclose()
    await b.aclose()


async def test_redis_keys_carry_the_prefix_and_expire(redis_server: RedisServer) -> None:
    store = redis_store(redis_server)
    await store.hit([Window("k", 60, limit=5)])
    await store.mark("m", 30)
    raw = aioredis.Redis.from_url(redis_server.url)
    keys = sorted(k.decode() for k in await raw.keys(store.prefix + "*"))
    assert keys == [store.prefix + "k", store.prefix + "m"]
    ttl_ms = await raw.pttl(store.prefix + "k")
    assert 60000 < ttl_ms <= 61000 + 60000 // SLOTS  # the window plus one slot
    assert 0 < await raw.pttl(store.prefix + "m") <= 30000
    await raw.aclose()
    await store.aclose()


def test_memory_store_is_bounded() -> None:
    now = [0]
    store = MemoryStore(max_keys=3, clock=lambda: now[0])
    before = sample("spamgate_state_store_evictions_total")

    async def go() -> None:
        for key in ("a", "b", "c"):
            await store.mark(key, 60)
        assert await store.marked(["a"]) == (True,)  # "a" is now the most recently used
        await store.mark("d", 60)
        await store.hit([Window("e", 60)])
        assert len(store) == 3
        assert await store.marked(["a", "b", "c", "d"]) == (True, False, False, True)

    asyncio.run(go())
    assert sample("spamgate_state_store_evictions_total") - before == 2


def test_memory_window_slots() -> None:
    """With a fake clock: an event leaves between 59/60 and 60/60 of a window later."""
    now = [6_000_000]  # ms, on a slot boundary for a 60 s window (1 s slots)
    store = MemoryStore(clock=lambda: now[0])
    w = Window("w", 60, limit=1)

    async def at(ms: int) -> bool:
        now[0] = 6_000_000 + ms
        return (await store.hit([w])).allowed

    async def go() -> None:
        assert await at(500)  # slot 0 of the window
        assert not await at(59_000)
        assert not await at(59_499)
        assert await at(60_000)  # slot 0 has left: 59.5 s after the event

    asyncio.run(go())


async def test_redis_outage_fails_fast_and_recovers(fresh_redis: RedisServer) -> None:
    store = redis_store(fresh_redis, timeout=0.5, retry_interval=0.2)
    w = Window("o", 60, limit=100)
    assert (await store.hit([w])).allowed
    assert sample("spamgate_state_store_up") == 1
    fresh_redis.stop()
    errors = sample("spamgate_state_store_errors_total", op="hit", kind="error")
    with pytest.raises(StoreUnavailable):
        await store.hit([w])
    assert not store.available
    assert sample("spamgate_state_store_up") == 0
    assert sample("spamgate_state_store_errors_total", op="hit", kind="error") == errors + 1
    skipped = sample("spamgate_state_store_errors_total", op="marked", kind="skipped")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await store.marked(["x"])
    assert time.monotonic() - started < 0.05  # no connection attempt while down
    assert sample("spamgate_state_store_errors_total", op="marked", kind="skipped") == skipped + 1

    fresh_redis.start()  # same port, empty, without the scripts loaded
    for _ in range(50):
        if store.available:
            break
        await asyncio.sleep(0.05)
    assert store.available
    assert sample("spamgate_state_store_up") == 1
    assert (await store.hit([w])).counts == (1,)  # the restarted server forgot
    assert await store.first_seen("fs", 10) == 0.0
    await store.aclose()


def test_state_settings_are_checked() -> None:
    from spamgate.app import loads
    from spamgate.config.settings import ConfigError

    cfg = loads('[state]\nredis = "redis://127.0.0.1:6390/2"\non_unavailable = "tempfail"\n')
    assert cfg.state.redis.endswith("/2") and cfg.state.on_unavailable == "tempfail"
    with pytest.raises(ConfigError) as err:
        loads('[state]\nredis = "http://x"\non_unavailable = "closed"\n', "s.toml")
    redis_problem = 's.toml:2: [state] redis: "http://x" is not a Redis URL'
    assert err.value.problems[0].startswith(redis_problem)
    assert err.value.problems[1].startswith("s.toml:3: [state] on_unavailable: expected")


def test_client_networks() -> None:
    from ipaddress import ip_address

    from spamgate.state import network_of

    assert network_of(ip_address("192.0.2.77"), 24, 64) == "192.0.2.0/24"
    assert network_of(ip_address("192.0.2.77"), 32, 64) == "192.0.2.77/32"
    assert network_of(ip_address("2001:db8:1:2:3::9"), 24, 64) == "2001:db8:1:2::/64"
    assert network_of(ip_address("2001:db8:1:2:3::9"), 24, 48) == "2001:db8:1::/48"
