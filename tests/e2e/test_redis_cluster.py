"""Shared state on a Redis Cluster of three primaries (started here, on loopback).

The stateful checks' own tests run on the cluster too (`state_toml`); these are
what only a cluster has: windows of one hit in several hash slots, keys that
must share a slot, and a slot moving to another node under a running script.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from spamgate.state import StoreUnavailable, Window
from tests.kit.redisserver import ClusterSet, RedisServer
from tests.kit.sink import Sink

from ..conftest import REDIS_CLI, REDIS_SERVER, GateFactory, need_binary, state_section
from .stateful import codes, send
from .test_state import redis_store


def node_id(node: RedisServer) -> str:
    return node.client(decode_responses=True).cluster("MYID")


@pytest.fixture
def fresh_cluster() -> Iterator[ClusterSet]:
    """A cluster of the test's own, whose slots the test may move."""
    need_binary(REDIS_SERVER, "redis-server")
    need_binary(REDIS_CLI, "redis-cli (redis-tools)")
    cluster = ClusterSet().start()
    yield cluster
    cluster.stop()


async def test_a_hit_across_slots_is_all_or_nothing(redis_cluster: ClusterSet) -> None:
    store = redis_store(redis_cluster)
    # two keys on two different nodes: one script each
    keys = [f"k{i}" for i in range(20)]
    first = redis_cluster.node_of(store.prefix + keys[0])
    other = next(k for k in keys if redis_cluster.node_of(store.prefix + k) is not first)
    free, full = Window(keys[0], 60, limit=5), Window(other, 60, limit=1)
    assert (await store.hit([full])).allowed
    hit = await store.hit([free, full])
    assert hit.exceeded == 1 and hit.counts == (0, 1)
    assert (await store.hit([Window(keys[0], 60, cost=0)])).counts == (0,)  # taken back
    hit = await store.hit([Window(other, 60, limit=1), Window(keys[0], 60, limit=5, cost=2)])
    assert hit.exceeded == 0 and hit.counts == (1, 0)
    await store.aclose()


async def test_concurrent_hits_across_slots_never_overshoot(redis_cluster: ClusterSet) -> None:
    """Forty requests race for ten units of one window and a roomy one elsewhere: ten
    get through, and the take-backs leave the roomy window counting exactly those."""
    stores = [redis_store(redis_cluster) for _ in range(2)]
    stores[1].prefix = stores[0].prefix  # two instances, one quota
    tight = "tight"
    roomy = next(
        k
        for k in (f"roomy{i}" for i in range(50))
        if redis_cluster.node_of(stores[0].prefix + k)
        is not redis_cluster.node_of(stores[0].prefix + tight)
    )
    windows = [Window(roomy, 60, limit=1000), Window(tight, 60, limit=10)]
    results = await asyncio.gather(*(stores[i % 2].hit(windows) for i in range(40)))
    assert sum(r.allowed for r in results) == 10
    assert {r.exceeded for r in results if not r.allowed} == {1}
    assert (await stores[0].hit([Window(roomy, 60, cost=0)])).counts == (10,)
    for s in stores:
        await s.aclose()


async def test_a_clients_windows_share_a_slot(
    gate_factory: GateFactory, redis_cluster: ClusterSet
) -> None:
    state = state_section(redis_cluster)
    prefix = state.split('key_prefix = "')[1].split('"')[0]
    limits = '[ratelimit]\nmessages_per_ip = "5/1m"\nmessages_per_net = "50/1m"\n'
    gate = await gate_factory(state + limits + 'messages_per_sender_domain = "50/1m"\n')
    assert codes(await send(gate))[-1] == 250
    keys: list[bytes] = []
    for node in redis_cluster.nodes:
        keys += node.client().keys(prefix + "*")
    slots = {
        key.decode().split(":")[3]: redis_cluster.nodes[0].client().cluster("KEYSLOT", key)
        for key in keys
    }
    assert len(slots) == 3
    assert slots["messages_per_ip"] == slots["messages_per_net"]  # tag: the client's /24
    assert {k.decode().split("}")[0] for k in keys} == {
        f"{prefix}rl:{{127.0.0.0/24",
        f"{prefix}rl:{{example.org",
    }


async def test_a_slot_moving_under_the_script(
    gate_factory: GateFactory,
    sink: Sink,
    fresh_cluster: ClusterSet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Half the keys of a script moved to another node (MIGRATE, the slot MIGRATING and
    IMPORTING): Redis says TRYAGAIN until the move ends. The session gets the
    on_unavailable answer and the log says why; once the slot has moved, the counts
    moved with it and the limit goes on."""
    cluster = fresh_cluster
    state = state_section(cluster, timeout=3, on_unavailable='"tempfail"')
    prefix = state.split('key_prefix = "')[1].split('"')[0]
    limits = '[ratelimit]\nmessages_per_ip = "3/1m"\nmessages_per_net = "50/1m"\n'
    gate = await gate_factory(state + limits)
    assert codes(await send(gate))[-1] == 250

    tag = "{127.0.0.0/24}"
    source = cluster.node_of(prefix + "rl:" + tag)
    target = next(n for n in cluster.nodes if n is not source)
    slot = source.client().cluster("KEYSLOT", tag)
    src, dst = source.client(decode_responses=True), target.client(decode_responses=True)
    keys = sorted(src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10))
    assert len(keys) == 2 and "messages_per_ip" in keys[0]
    dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
    src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))
    src.execute_command("MIGRATE", "127.0.0.1", target.port, keys[0], 0, 5000)

    replies = await send(gate)
    assert codes(replies)[-1] == 451
    assert gate.server.services.state.available  # an answer from Redis, not an outage
    assert "hash slot is being moved between cluster nodes" in caplog.text
    assert "on_unavailable=tempfail" in caplog.text

    src.execute_command("MIGRATE", "127.0.0.1", target.port, keys[1], 0, 5000)
    for node in cluster.nodes:
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(target))
    # the first message's counts went along: two more fit under 3/1m, then no more
    assert [codes(await send(gate))[-1] for _ in range(3)] == [250, 250, 450]
    assert len(sink.messages) == 3
    assert sorted(dst.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 10)) == keys


async def test_a_cluster_node_down(fresh_cluster: ClusterSet, caplog) -> None:
    """One primary of three gone (no replica to promote): a clear log line and
    StoreUnavailable, whichever node the keys are on, then back when it is."""
    caplog.set_level(logging.INFO, logger="spamgate.state")
    store = redis_store(fresh_cluster, timeout=1.0, retry_interval=0.1)
    assert (await store.hit([Window("n", 60, limit=5)])).allowed
    down = fresh_cluster.node_of(store.prefix + "n")
    down.stop()
    with pytest.raises(StoreUnavailable):
        await store.hit([Window("n", 60, limit=5)])
    assert "state store cluster via 127.0.0.1:" in caplog.text and "unreachable" in caplog.text
    assert not store.available
    down.start()  # empty again (no persistence), but it still owns its slots
    for _ in range(100):
        if store.available:
            break
        await asyncio.sleep(0.1)
    assert store.available
    assert "reachable again" in caplog.text
    assert (await store.hit([Window("n", 60, limit=5)])).counts == (1,)
    await store.aclose()
