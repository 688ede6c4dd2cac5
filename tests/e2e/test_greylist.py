"""Greylisting over SMTP, against the in-process store and Redis."""

from __future__ import annotations

import asyncio

import pytest

from spamgate.app import build, loads
from spamgate.checks.greylist import normalise_sender
from spamgate.config.settings import ConfigError
from spamgate.ops.server import Server
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory
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


async def test_spf_pass_for_well_known_domains_skips(
    gate_factory: GateFactory, dns_server: DnsServer, state_toml: str
) -> None:
    spf = "v=spf1 ip4:127.0.0.0/24 -all"
    for zone in ("bigmail.test", "mx.provider.test", "small.test"):
        dns_server.zone(zone, {"@": {"TXT": spf}})
    dns_server.zone("soft.test", {"@": {"TXT": "v=spf1 ip4:192.0.2.0/24 ~all"}})
    gate = await gate_factory(
        state_toml
        + greylist(spf_pass_domains='["bigmail.test", ".provider.test", "soft.test"]')
        + "[spf]\nenabled = true\nhelo = false\n"
    )
    assert codes(await send(gate, sender="a@bigmail.test"))[-1] == 250
    assert codes(await send(gate, sender="a@mx.provider.test"))[-1] == 250
    assert codes(await send(gate, sender="a@small.test"))[3] == 450  # passes, not listed
    assert codes(await send(gate, sender="a@soft.test"))[3] == 450  # listed, no pass


async def test_allowlist_tables(
    gate_factory: GateFactory, dns_server: DnsServer, state_toml: str, tmp_path
) -> None:
    dns_server.zone("1.0.127.in-addr.arpa", {"7": {"PTR": "mail.partner.test."}})
    dns_server.zone("partner.test", {"mail": {"A": "127.0.1.7"}})
    (tmp_path / "grey.cidr").write_text("# partners\n127.0.0.6 DUNNO\n127.0.0.0/24 OK\n")
    (tmp_path / "grey").write_text("mail.partner.test OK\n")
    gate = await gate_factory(
        state_toml + greylist(allowlist=f'["cidr:{tmp_path}/grey.cidr", "hash:{tmp_path}/grey"]')
    )
    assert codes(await send(gate, source="127.0.0.5"))[-1] == 250  # OK
    assert codes(await send(gate, source="127.0.0.6"))[3] == 450  # DUNNO: an exception
    assert codes(await send(gate, source="127.0.1.7"))[-1] == 250  # by verified name
    assert codes(await send(gate, source="127.0.1.5"))[3] == 450  # not listed


def test_allowlist_tables_say_ok_or_dunno(tmp_path) -> None:
    (tmp_path / "grey.cidr").write_text("127.0.0.0/24 OK\n10.0.0.0/8 REJECT go away\n")
    cfg = loads(greylist(allowlist='["cidr:grey.cidr"]'), str(tmp_path / "s.toml"))
    with pytest.raises(ConfigError) as err:
        Server(build(cfg))
    assert err.value.problems == [
        f"{tmp_path}/grey.cidr:2: a greylist allowlist says OK or DUNNO, not REJECT"
    ]
