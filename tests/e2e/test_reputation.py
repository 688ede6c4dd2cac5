"""Reputation memory over SMTP, against the in-process store and Redis."""

from __future__ import annotations

import asyncio

from spamgate.checks.reputation import ReputationResult
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import Gate, GateFactory
from .stateful import STRANGER, codes, send


def reputation(**values: object) -> str:
    return "[reputation]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


async def relay_attempt(gate: Gate, source: str = STRANGER) -> list[int]:
    """A transaction spamgate rejects: relaying for a foreign domain."""
    return codes(await send(gate, source=source, rcpts=("x@elsewhere.test",)))


async def learned(gate: Gate) -> None:
    await gate.server.app.background.drain()


async def test_rejected_clients_are_refused_at_connect(
    gate_factory: GateFactory, state_toml: str
) -> None:
    gate = await gate_factory(
        state_toml + reputation(reject_limit=2, reject_window=60, block_time=0.5)
    )
    assert await relay_attempt(gate) == [220, 250, 250, 554, 554]
    await learned(gate)
    assert (await send(gate))[0].code == 220  # one rejection is not enough
    assert (await relay_attempt(gate))[3] == 554
    await learned(gate)
    c, banner = await gate.client(source=STRANGER)
    assert (banner.code, banner.text) == (
        421,
        "4.7.0 Error: too many rejected messages from 127.0.0.5, try again later",
    )
    assert await c.closed()
    assert (await send(gate, source="127.0.0.6"))[-1].code == 250  # only that IP
    await asyncio.sleep(0.6)  # block_time over
    assert (await send(gate))[-1].code == 250


async def test_only_our_rejections_count(
    gate_factory: GateFactory, sink: Sink, state_toml: str
) -> None:
    gate = await gate_factory(
        state_toml
        + reputation(reject_limit=1, reject_window=60)
        + '[ratelimit]\nmessages_per_ip = "1/1m"\n'
    )
    sink.behaviour.refuse_local = "nobody"
    assert codes(await send(gate, rcpts=("nobody@example.test",)))[3] == 550  # upstream's
    assert codes(await send(gate))[-1] == 250
    assert codes(await send(gate))[-1] == 450  # a temporary refusal (rate limit)
    await learned(gate)
    assert (await send(gate))[0].code == 220
    for _ in range(3):  # nor are trusted clients judged
        assert (await relay_attempt(gate, source="127.0.0.1"))[3] == 250
    await learned(gate)
    assert (await send(gate, source="127.0.0.1"))[0].code == 220


async def known_good(gate: Gate) -> bool | None:
    """What a new session from the stranger recorded at connect (None: nothing)."""
    c, _ = await gate.client(source=STRANGER)
    port = c.writer.get_extra_info("sockname")[1]
    (session,) = [s for s in gate.server.runtime.sessions if s.model.client.port == port]
    result = session.model.results.get(ReputationResult)
    await c.close()
    return None if result is None else result.known_good


async def test_known_good_recorded_for_later_checks(
    gate_factory: GateFactory, state_toml: str
) -> None:
    gate = await gate_factory(state_toml + reputation(good_ttl=60, reject_limit=5))
    assert await known_good(gate) is None  # not known yet
    assert codes(await send(gate))[-1] == 250
    await learned(gate)
    assert await known_good(gate) is True
    # a rejection forgets it
    assert (await relay_attempt(gate))[3] == 554
    await learned(gate)
    assert await known_good(gate) is None


async def test_tagged_mail_does_not_make_a_client_good(
    gate_factory: GateFactory, state_toml: str
) -> None:
    gate = await gate_factory(state_toml + reputation(good_ttl=60) + "[scoring]\ntag = -1.0\n")
    assert codes(await send(gate))[-1] == 250  # score 0 >= tag -1: tagged
    await learned(gate)
    assert await known_good(gate) is None


async def test_off_by_default(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    for _ in range(5):
        await relay_attempt(gate)
    await learned(gate)
    assert (await send(gate))[-1].code == 250
    assert gate.server.runtime.policy.pipeline.observers == []


async def test_known_good_client_skips_the_dnsbl(
    gate_factory: GateFactory, dns_server: DnsServer, state_toml: str
) -> None:
    from spamgate import metrics
    from spamgate.checks.dnsbl import DnsblResult

    def lookups() -> float:
        labels = {"zone": "bl.test", "result": "not_listed"}
        return metrics.REGISTRY.get_sample_value("spamgate_dnsbl_results_total", labels) or 0

    async def dnsbl_ran() -> bool:
        c, banner = await gate.client(source=STRANGER)
        assert banner.code == 220
        port = c.writer.get_extra_info("sockname")[1]
        (session,) = [s for s in gate.server.runtime.sessions if s.model.client.port == port]
        await c.close()
        return session.model.results.get(DnsblResult) is not None

    dns_server.zone("bl.test", {"2.0.0.127": {"A": "127.0.0.2"}})
    gate = await gate_factory(
        state_toml + reputation(good_ttl=60) + '[dnsbl]\nsites = ["bl.test"]\n'
    )
    before = lookups()
    assert await dnsbl_ran()  # not known yet: looked up
    assert codes(await send(gate))[-1] == 250
    assert lookups() - before == 2
    await learned(gate)
    assert not await dnsbl_ran()  # known good: no lookup
    assert lookups() - before == 2
    c, _ = await gate.client(source="127.0.0.2")  # others are still looked up (and listed)
    assert (await c.cmd("EHLO x.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 554
    await c.close()
