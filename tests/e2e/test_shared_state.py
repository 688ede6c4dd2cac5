"""Several spamgate instances sharing one Redis, and what happens when Redis goes away."""

from __future__ import annotations

import asyncio
import logging

import pytest

from spamgate import metrics
from tests.kit.redisserver import RedisServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, state_section
from .stateful import codes, send

LIMIT = '[ratelimit]\nmessages_per_ip = "10/1m"\n'


async def wait_until_available(gate, timeout: float = 5.0) -> None:
    store = gate.server.services.state
    for _ in range(int(timeout / 0.05)):
        if store.available:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the state store did not come back")


async def test_limit_holds_across_two_instances(
    gate_factory: GateFactory, sink: Sink, redis_server: RedisServer
) -> None:
    state = state_section(redis_server)
    a = await gate_factory(state + LIMIT)
    b = await gate_factory(state + LIMIT)
    assert a.port != b.port
    for i in range(10):
        assert codes(await send(a if i % 2 else b))[-1] == 250
    for gate in (a, b):  # the 11th, whichever instance gets it
        replies = await send(gate)
        assert (replies[-1].code, replies[-1].enhanced) == (450, "4.7.1")
    assert len(sink.messages) == 10


async def test_concurrent_sessions_on_two_instances_share_exactly(
    gate_factory: GateFactory, sink: Sink, redis_server: RedisServer
) -> None:
    state = state_section(redis_server)
    gates = [await gate_factory(state + LIMIT) for _ in range(2)]
    results = await asyncio.gather(*(send(gates[i % 2]) for i in range(16)))
    assert sorted(r[-1].code for r in results) == [250] * 10 + [450] * 6
    assert len(sink.messages) == 10


async def test_instances_with_memory_stores_do_not_share(
    gate_factory: GateFactory, sink: Sink
) -> None:
    a = await gate_factory(LIMIT.replace("10/1m", "1/1m"))
    b = await gate_factory(LIMIT.replace("10/1m", "1/1m"))
    assert [codes(await send(g))[-1] for g in (a, b, a)] == [250, 250, 450]


async def test_greylist_retry_may_reach_another_instance(
    gate_factory: GateFactory, redis_server: RedisServer
) -> None:
    state = state_section(redis_server) + "[greylist]\nenabled = true\ndelay = 0.2\n"
    a, b = await gate_factory(state), await gate_factory(state)
    assert codes(await send(a))[3] == 450
    assert codes(await send(b))[3] == 450  # b knows the first attempt: still too early
    await asyncio.sleep(0.25)
    assert codes(await send(b))[-1] == 250


async def test_reputation_learned_on_one_instance_applies_on_another(
    gate_factory: GateFactory, redis_server: RedisServer
) -> None:
    state = state_section(redis_server) + "[reputation]\nreject_limit = 1\n"
    a, b = await gate_factory(state), await gate_factory(state)
    assert codes(await send(a, rcpts=("x@elsewhere.test",)))[3] == 554
    await a.server.app.background.drain()
    assert (await send(b))[0].code == 421


async def test_redis_outage_fails_open_then_sharing_resumes(
    gate_factory: GateFactory,
    sink: Sink,
    fresh_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="spamgate.state")
    state = state_section(fresh_redis, retry_interval=0.1, timeout=0.5)
    a = await gate_factory(state + LIMIT)
    b = await gate_factory(state + LIMIT)
    for i in range(10):
        assert codes(await send(a if i % 2 else b))[-1] == 250
    assert codes(await send(a))[-1] == 450

    fresh_redis.stop()
    skipped = metrics.REGISTRY.get_sample_value(
        "spamgate_state_store_errors_total", {"op": "hit", "kind": "skipped"}
    )
    # fail open: the limit is not enforced while no instance can count
    for i in range(6):
        assert codes(await send(a if i % 2 else b))[-1] == 250
    assert "unreachable" in caplog.text and "on_unavailable=open" in caplog.text
    assert metrics.REGISTRY.get_sample_value("spamgate_state_store_up") == 0
    assert metrics.REGISTRY.get_sample_value(
        "spamgate_state_store_errors_total", {"op": "hit", "kind": "skipped"}
    ) > (skipped or 0)

    fresh_redis.start()  # back, empty
    await wait_until_available(a)
    await wait_until_available(b)
    assert "reachable again" in caplog.text
    for i in range(10):
        assert codes(await send(a if i % 2 else b))[-1] == 250
    for gate in (a, b):
        assert codes(await send(gate))[-1] == 450
    assert len(sink.messages) == 26


async def test_redis_outage_with_tempfail_policy(
    gate_factory: GateFactory, sink: Sink, fresh_redis: RedisServer
) -> None:
    state = state_section(fresh_redis, retry_interval=0.1, on_unavailable='"tempfail"')
    gate = await gate_factory(state + LIMIT + "[greylist]\nenabled = true\ndelay = 0\n")
    assert codes(await send(gate))[-1] == 250
    fresh_redis.stop()
    replies = await send(gate)
    assert codes(replies) == [220, 250, 250, 451, 554]  # greylisting could not decide at RCPT
    assert replies[3].text == "4.3.0 Temporary failure in a message check, try again later"
    fresh_redis.start()
    await wait_until_available(gate)
    assert codes(await send(gate))[-1] == 250
    assert len(sink.messages) == 2


async def test_starts_and_serves_with_redis_unreachable(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    dead = RedisServer()  # a free port nobody listens on
    gate = await gate_factory(state_section(dead) + LIMIT.replace("10/1m", "1/1m"))
    assert "unreachable" in caplog.text  # said at start, not at the first session
    assert not gate.server.services.state.available
    assert [codes(await send(gate))[-1] for _ in range(2)] == [250, 250]  # fail open


def test_explain_leaves_the_shared_store_alone(redis_server: RedisServer, tmp_path) -> None:
    import contextlib
    import io

    import redis

    from spamgate.cli import main

    state = state_section(redis_server)
    prefix = state.split('key_prefix = "')[1].split('"')[0]
    config = tmp_path / "c.toml"
    config.write_text(
        state
        + '[server]\nrelay_domains = ["example.test"]\n[dns]\nreverse_lookup = false\n'
        + LIMIT
        + "[greylist]\nenabled = true\n[reputation]\nreject_limit = 1\ngood_ttl = 60\n"
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            ["explain", "-c", str(config), "--client", "192.0.2.7", "--rcpt", "u@example.test"]
        )
    assert code != 0 and "Greylisted" in out.getvalue()  # the checks ran...
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.keys(prefix + "*") == []  # ...against a store of their own
    raw.close()
