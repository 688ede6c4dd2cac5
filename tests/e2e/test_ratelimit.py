"""Rate limits over SMTP, each against the in-process store and Redis."""

from __future__ import annotations

import asyncio

import pytest

from spamgate.app import build, loads
from spamgate.checks.ratelimit import Limit, parse_limit
from spamgate.config.settings import ConfigError
from tests.kit.sink import Sink

from ..conftest import GateFactory
from .stateful import STRANGER, codes, send


def limits(**values: str) -> str:
    return "[ratelimit]\n" + "".join(f'{k} = "{v}"\n' for k, v in values.items())


def test_limit_syntax() -> None:
    assert parse_limit("30/1m") == Limit(30, 60)
    assert parse_limit("100/h") == Limit(100, 3600)
    assert parse_limit(" 5 / 0.5s ") == Limit(5, 0.5)
    assert parse_limit("7/10") == Limit(7, 10)
    assert parse_limit("") is None
    for bad in ("ten/1m", "5/1w", "5", "5/0s"):
        with pytest.raises(ValueError):
            parse_limit(bad)
    with pytest.raises(ConfigError) as err:
        loads('[ratelimit]\nmessages_per_ip = "lots"\n', "r.toml")
    assert err.value.problems[0].startswith("r.toml:2: [ratelimit] messages_per_ip:")


async def test_connections_per_ip(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + limits(connections_per_ip="2/1m"))
    for _ in range(2):
        c, banner = await gate.client(source=STRANGER)
        assert banner.code == 220
        await c.close()
    c, banner = await gate.client(source=STRANGER)
    assert (banner.code, banner.text) == (
        421,
        "4.7.0 Error: too many connections from 127.0.0.5",
    )
    assert await c.closed()
    c, banner = await gate.client(source="127.0.0.6")  # another client
    assert banner.code == 220
    await c.close()


async def test_connections_per_net(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + limits(connections_per_net="2/1m"))
    for source in ("127.0.0.5", "127.0.0.6"):
        c, banner = await gate.client(source=source)
        assert banner.code == 220
        await c.close()
    c, banner = await gate.client(source="127.0.0.7")
    assert banner.code == 421
    assert banner.text == "4.7.0 Error: too many connections from 127.0.0.0/24"
    await c.close()
    c, banner = await gate.client(source="127.0.1.7")  # another /24
    assert banner.code == 220
    await c.close()


async def test_messages_per_ip(gate_factory: GateFactory, sink: Sink, state_toml: str) -> None:
    gate = await gate_factory(state_toml + limits(messages_per_ip="3/1m"))
    for _ in range(3):
        assert codes(await send(gate)) == [220, 250, 250, 250, 354, 250]
    replies = await send(gate)
    assert codes(replies) == [220, 250, 250, 250, 450]  # at DATA
    assert replies[-1].text == "4.7.1 Error: too much mail from 127.0.0.5, try again later"
    assert len(sink.messages) == 3
    assert codes(await send(gate, source="127.0.0.6"))[-1] == 250


async def test_recipients_per_ip(gate_factory: GateFactory, sink: Sink, state_toml: str) -> None:
    gate = await gate_factory(state_toml + limits(recipients_per_ip="3/1m"))
    rcpts = tuple(f"u{i}@example.test" for i in range(5))
    replies = await send(gate, rcpts=rcpts)
    assert codes(replies) == [220, 250, 250, 250, 250, 250, 450, 450, 354, 250]
    assert replies[6].text == "4.7.1 Error: too many recipients from 127.0.0.5, try again later"
    assert sink.messages[0].rcpt_tos == ["u0@example.test", "u1@example.test", "u2@example.test"]
    assert codes(await send(gate))[3] == 450  # refused RCPTs did not count, the quota is used


async def test_sender_domain_limits(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(
        state_toml + limits(messages_per_sender_domain="1/1m", recipients_per_sender_domain="3/1m")
    )
    assert codes(await send(gate, sender="a@example.org"))[-1] == 250
    replies = await send(gate, source="127.0.0.6", sender="b@EXAMPLE.org")
    assert replies[-1].code == 450
    assert replies[-1].text.endswith(
        "too much mail from sender domain example.org, try again later"
    )
    assert codes(await send(gate, sender="a@example.net"))[-1] == 250
    # the null sender (bounces) has no domain to count
    for _ in range(2):
        assert codes(await send(gate, sender=""))[-1] == 250
    rcpts = ("x@example.test", "y@example.test", "z@example.test")
    replies = await send(gate, sender="c@example.net", rcpts=rcpts)
    # 3 recipients from example.net in all, then its 1 message a minute is used up
    assert codes(replies) == [220, 250, 250, 250, 250, 450, 450]
    assert "too many recipients from sender domain example.net" in replies[5].text
    assert "too much mail from sender domain example.net" in replies[6].text


async def test_messages_per_recipient(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + limits(messages_per_recipient="2/1m"))
    for source in ("127.0.0.5", "127.0.0.6"):
        assert codes(await send(gate, source=source, rcpts=("U@example.test",)))[-1] == 250
    replies = await send(gate, source="127.0.0.7", rcpts=("u@example.test", "v@example.test"))
    assert codes(replies) == [220, 250, 250, 450, 250, 354, 250]
    assert replies[3].text == (
        "4.7.1 <u@example.test>: Error: too much mail for this recipient, try again later"
    )


async def test_mynetworks_exempt_unless_configured(
    gate_factory: GateFactory, state_toml: str
) -> None:
    gate = await gate_factory(state_toml + limits(messages_per_ip="1/1m"))
    for _ in range(3):
        assert codes(await send(gate, source="127.0.0.1"))[-1] == 250
    strict = await gate_factory(
        state_toml + limits(messages_per_ip="1/1m") + "exempt_mynetworks = false\n"
    )
    assert codes(await send(strict, source="127.0.0.1"))[-1] == 250
    assert codes(await send(strict, source="127.0.0.1"))[-1] == 450


async def test_window_slides_over_smtp(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + limits(messages_per_ip="2/0.5s"))
    assert [codes(await send(gate))[-1] for _ in range(3)] == [250, 250, 450]
    await asyncio.sleep(0.6)
    assert codes(await send(gate))[-1] == 250


async def test_monitor_mode_only_counts(gate_factory: GateFactory, state_toml: str) -> None:
    from spamgate import metrics

    def would() -> float:
        labels = {"stage": "data", "check": "ratelimit", "action": "defer"}
        return metrics.REGISTRY.get_sample_value("spamgate_monitor_verdicts_total", labels) or 0

    before = would()
    gate = await gate_factory(
        state_toml + limits(messages_per_ip="1/1m"), server={"mode": '"monitor"'}
    )
    assert [codes(await send(gate))[-1] for _ in range(3)] == [250, 250, 250]
    assert would() - before == 2


def test_override_values() -> None:
    from spamgate.checks.ratelimit import KINDS, parse_overrides

    assert parse_overrides("messages_per_ip=10000/1h, recipients_per_ip=off") == {
        "messages_per_ip": Limit(10000, 3600),
        "recipients_per_ip": None,
    }
    assert parse_overrides("UNLIMITED") == dict.fromkeys(KINDS)
    for bad, why in [
        ("", "no limits"),
        ("messages=5/1m", "not a rate limit"),
        ("messages_per_ip", "not name=COUNT/PERIOD"),
        ("messages_per_ip=lots", "COUNT/PERIOD"),
        ("messages_per_ip=", "give a limit or off"),
        ("messages_per_ip=1/1m messages_per_ip=2/1m", "given twice"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_overrides(bad)


async def test_per_client_overrides(gate_factory: GateFactory, state_toml: str, tmp_path) -> None:
    """A partner gets more; another client none; the rest the configured limit."""
    (tmp_path / "partners.cidr").write_text("127.0.0.9 DUNNO\n127.0.0.0/29 OK\n")
    (tmp_path / "unlimited").write_text("127.0.0.8 OK\n")
    gate = await gate_factory(
        state_toml
        + limits(messages_per_ip="1/1m", recipients_per_ip="5/1m")
        + "[ratelimit.overrides]\n"
        + f'"cidr:{tmp_path}/partners.cidr" = "messages_per_ip=3/1m"\n'
        + f'"hash:{tmp_path}/unlimited" = "unlimited"\n'
    )
    assert [codes(await send(gate, source="127.0.0.7"))[-1] for _ in range(4)] == [250] * 3 + [450]
    assert [codes(await send(gate, source="127.0.0.8"))[-1] for _ in range(4)] == [250] * 4
    assert [codes(await send(gate, source="127.0.0.9"))[-1] for _ in range(2)] == [250, 450]
    replies = await send(
        gate, source="127.0.0.7", rcpts=tuple(f"u{i}@example.test" for i in range(6))
    )
    # recipients_per_ip is still 5 for it: 4 used above (the refused DATA's RCPT too)
    assert codes(replies)[3:9] == [250] + [450] * 5


def test_override_tables_are_checked(tmp_path) -> None:
    from spamgate.ops.server import Server

    (tmp_path / "p.cidr").write_text("127.0.0.0/8 REJECT\n")
    text = '[ratelimit]\nmessages_per_ip = "1/1m"\n[ratelimit.overrides]\n'
    with pytest.raises(ConfigError) as err:
        loads(text + '"cidr:p.cidr" = "messages_per_ip=lots"\n', str(tmp_path / "c.toml"))
    assert 'overrides: "cidr:p.cidr": "lots" is not "COUNT/PERIOD"' in err.value.problems[0]
    cfg = loads(text + '"cidr:p.cidr" = "unlimited"\n', str(tmp_path / "c.toml"))
    with pytest.raises(ConfigError) as err:
        Server(build(cfg))
    assert err.value.problems == [
        f"{tmp_path}/p.cidr:1: a rate-limit override table says OK or DUNNO, not REJECT"
    ]


async def test_counts_survive_a_reload(gate_factory: GateFactory, state_toml: str) -> None:
    gate = await gate_factory(state_toml + limits(messages_per_ip="2/1m"))
    assert codes(await send(gate))[-1] == 250
    before = gate.server.runtime.policy
    assert await gate.server.reload(gate.server.config.path)
    assert gate.server.runtime.policy is not before  # new checks, the same store
    assert [codes(await send(gate))[-1] for _ in range(2)] == [250, 450]


def test_override_and_allowlist_tables_are_watched(tmp_path) -> None:
    from spamgate.app import sources

    text = (
        '[ratelimit]\nmessages_per_ip = "1/1m"\n'
        '[ratelimit.overrides]\n"cidr:p.cidr" = "unlimited"\n'
        '[greylist]\nenabled = true\nallowlist = ["hash:grey"]\n'
    )
    cfg = loads(text, str(tmp_path / "c.toml"))
    assert sources(cfg) == [str(tmp_path / f) for f in ("c.toml", "p.cidr", "grey")]
