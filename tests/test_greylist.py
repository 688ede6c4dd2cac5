"""Greylisting over SMTP, against the in-process store and Redis."""

from __future__ import annotations

import asyncio

from spamgate.checks.greylist import normalise_sender

from .conftest import GateFactory
from .sink import Sink
from .stateful import codes, send

DELAY = 0.3


def greylist(**extra: str) -> str:
    values = {"enabled": "true", "delay": str(DELAY), **extra}
    return "[greylist]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def test_sender_normalisation() -> None:
    assert normalise_sender("Bob@Example.ORG") == "bob@example.org"
    assert normalise_sender("list+bounces-123-bob=x.test@lists.test") == "list@lists.test"
    assert normalise_sender("prvs=1a2b3c4d=bob@example.org") == "bob@example.org"
    assert normalise_sender("bounce-4711-17@news.test") == "bounce-#-#@news.test"
    assert normalise_sender("") == ""


async def test_first_attempt_deferred_retry_passes(
    gate_factory: GateFactory, sink: Sink, state_toml: str
) -> None:
    gate = await gate_factory(state_toml + greylist())
    replies = await send(gate)
    assert codes(replies) == [220, 250, 250, 450, 554]  # no recipient left for DATA
    assert replies[3].text == "4.7.1 <u@example.test>: Greylisted, please try again in 1 second"
    assert codes(await send(gate))[3] == 450  # too early
    await asyncio.sleep(DELAY + 0.05)
    # a retry from another address of the same /24 counts as the same client
    assert codes(await send(gate, source="127.0.0.6"))[-1] == 250
    assert codes(await send(gate))[-1] == 250  # the triplet is known now
    assert len(sink.messages) == 2


async def test_each_triplet_is_apart(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + greylist(auto_allowlist_after="0"))
    assert codes(await send(gate))[3] == 450
    await asyncio.sleep(DELAY + 0.05)
    assert codes(await send(gate))[-1] == 250
    assert codes(await send(gate, rcpts=("v@example.test",)))[3] == 450  # new recipient
    assert codes(await send(gate, sender="b@example.org"))[3] == 450  # new sender
    assert codes(await send(gate, source="127.0.1.5"))[3] == 450  # new network
    replies = await send(gate, rcpts=("u@example.test", "w@example.test"))
    assert codes(replies) == [220, 250, 250, 250, 450, 354, 250]  # per recipient


async def test_auto_allowlist(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + greylist(auto_allowlist_after="2"))
    rcpts = ("u1@example.test", "u2@example.test")
    assert codes(await send(gate, rcpts=rcpts))[3:5] == [450, 450]
    await asyncio.sleep(DELAY + 0.05)
    assert codes(await send(gate, rcpts=rcpts))[3:5] == [250, 250]
    # two triplets passed: the /24 now skips greylisting for new triplets
    assert codes(await send(gate, sender="new@example.org", source="127.0.0.9"))[-1] == 250


async def test_retry_window_expires(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + greylist(delay="0.1", retry_window="0.3"))
    assert codes(await send(gate))[3] == 450
    await asyncio.sleep(0.4)  # past the retry window: the first attempt is forgotten
    replies = await send(gate)
    assert codes(replies)[3] == 450


async def test_trusted_and_allowed_clients_skip(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + greylist(allow_clients='["127.0.2.0/24"]'))
    assert codes(await send(gate, source="127.0.0.1"))[-1] == 250  # mynetworks
    assert codes(await send(gate, source="127.0.2.9"))[-1] == 250
    assert codes(await send(gate, source="127.0.3.9"))[3] == 450


async def test_off_by_default(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    assert codes(await send(gate))[-1] == 250
