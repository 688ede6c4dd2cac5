"""spamgate replay: sessions recorded through the proxy, replayed against candidates.

Every test records real sessions (real sockets, the tests' DNS server and sink,
the real checks), then replays the capture through a changed configuration with
the real session driver, and asserts exactly what changed and which rule decided
it: rule tables, symbol weights, score thresholds, monitor mode, a new DNS list
zone (unknown without --live-dns, decided with it), rate limits and greylisting
from the recorded state store answers.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re

import pytest

from tests.e2e import scripted
from tests.kit.dnsserver import DnsServer

from ..conftest import GateFactory
from .capturekit import (
    EXPECTED,
    TRAFFIC,
    Send,
    body,
    capture_toml,
    changes,
    cli,
    config_of,
    replay_dir,
    send,
    settled,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
async def recorded(gate_factory: GateFactory, dns_server: DnsServer, tmp_path) -> pathlib.Path:
    """TRAFFIC recorded through the proxy; the gate's config is spamgate-0.toml."""
    scripted.publish_dns(dns_server)
    directory = tmp_path / "capture"
    extra = scripted.write_rules(tmp_path) + scripted.DNS_CHECKS + capture_toml(directory)
    gate = await gate_factory(extra)
    got = [await send(gate, s) for s in TRAFFIC]
    assert got == EXPECTED
    records = await settled(directory, len(TRAFFIC))
    assert len(records) == len(TRAFFIC)
    return tmp_path


def candidate(tmp_path: pathlib.Path, old: str, new: str) -> pathlib.Path:
    text = (tmp_path / "spamgate-0.toml").read_text()
    assert old in text
    path = tmp_path / "candidate.toml"
    path.write_text(text.replace(old, new, 1))
    return path


async def test_the_running_configuration_changes_nothing(recorded: pathlib.Path) -> None:
    config = config_of(recorded / "spamgate-0.toml")
    diff = await replay_dir(config, recorded / "capture")
    assert diff.total == len(TRAFFIC)
    assert dict(diff.counts) == {"kept": len(TRAFFIC)}
    assert diff.listed == [] and diff.rules == {} and diff.errors == []
    assert diff.status == 0


async def test_rule_table_changes(recorded: pathlib.Path) -> None:
    table = recorded / "recipient"
    text = table.read_text()
    table.write_text(
        text.replace("defer@example.test    DEFER Try later\n", "").replace(
            "reject@example.test   550 5.1.1 No such user", "reject@example.test   DEFER busy"
        )
    )
    config = config_of(recorded / "spamgate-0.toml")
    diff = await replay_dir(config, recorded / "capture")
    assert changes(diff) == {
        "127.0.0.24": ("accepted", "recipient:2"),  # its DEFER line gone: let through
        "127.0.0.23": ("changed", "recipient:1"),  # 550 -> 450 for one recipient
    }
    assert diff.counts["kept"] == len(TRAFFIC) - 2
    (defer,) = [x for x in diff.listed if x["class"] == "accepted"]
    assert defer["before"]["outcome"] == "tempfailed" and defer["before"]["code"] == 450
    # accepted at RCPT; the client, refused then, never sent the message: "envelope"
    assert defer["after"]["outcome"] == "envelope" and defer["after"]["recipients"] == [250]
    assert "the client sent no message then" in defer["after"]["text"]
    (changed,) = [x for x in diff.listed if x["class"] == "changed"]
    assert changed["before"]["recipients"] == [550, 250]
    assert changed["after"]["recipients"] == [450, 250]
    assert diff.status == 1


async def test_weights_and_thresholds(recorded: pathlib.Path) -> None:
    # SMALL_SCORE weighs 2: at 16 it reaches the reject threshold (15).
    heavier = candidate(recorded, "[dnsbl]", "[scoring]\nsymbols = { SMALL_SCORE = 16 }\n\n[dnsbl]")
    diff = await replay_dir(config_of(heavier), recorded / "capture")
    assert changes(diff) == {"127.0.0.27": ("refused", "score:reject")}
    (x,) = diff.listed
    assert (x["before"]["score"], x["after"]["score"]) == (2.0, 16.0)
    assert x["after"]["stage"] == "eod" and x["after"]["code"] == 550

    # At 6 it crosses only the tag threshold (5): the message gains X-Spam-Flag.
    tagged = candidate(recorded, "[dnsbl]", "[scoring]\nsymbols = { SMALL_SCORE = 6 }\n\n[dnsbl]")
    diff = await replay_dir(config_of(tagged), recorded / "capture")
    assert changes(diff) == {"127.0.0.27": ("changed", "score:tag")}
    assert diff.listed[0]["after"]["tagged"] and not diff.listed[0]["before"]["tagged"]

    # A reject threshold of 1.5 refuses the score-2 message too.
    lower = candidate(recorded, "[dnsbl]", "[scoring]\nreject = 1.5\n\n[dnsbl]")
    diff = await replay_dir(config_of(lower), recorded / "capture")
    assert changes(diff) == {"127.0.0.27": ("refused", "score:reject")}
    # ... and a higher one lets the score-20 message through (tagged: 20 >= 5)
    higher = candidate(recorded, "[dnsbl]", "[scoring]\nreject = 25\n\n[dnsbl]")
    diff = await replay_dir(config_of(higher), recorded / "capture")
    assert changes(diff) == {"127.0.0.28": ("accepted", "score:reject")}
    assert diff.listed[0]["after"]["tagged"]


async def test_monitor_mode(recorded: pathlib.Path, dns_server: DnsServer) -> None:
    path = candidate(recorded, "[server]", '[server]\nmode = "monitor"')
    # Without the network: what was refused early spared its later lookups, and a
    # candidate that refuses nothing asks them: those transactions are unknown.
    diff = await replay_dir(config_of(path), recorded / "capture")
    unknown = {a for a, (kind, _) in changes(diff).items() if kind == "unknown"}
    assert unknown == {"127.0.0.2", "127.0.0.3", "127.0.0.9", "127.0.0.21", "127.0.0.34"} | {
        "127.0.0.29"  # the header rule's REJECT ended the stage: DKIM never ran on it
    }
    # SPF for the HELO name, which a refusal held since connect had spared
    assert diff.unknown_asked["DNS client.example.test/TXT"] == 3
    # With --live-dns the test DNS server answers them, and the diff is complete.
    diff = await replay_dir(config_of(path), recorded / "capture", live=True)
    assert changes(diff) == {
        "127.0.0.2": ("accepted", "dnsbl:zen.bl.test"),
        "127.0.0.3": ("accepted", "dnsbl:bad.bl.test"),
        "127.0.0.9": ("accepted", "client.cidr:2"),
        "127.0.0.21": ("accepted", "helo.regexp:1"),
        "127.0.0.22": ("accepted", "spf:fail"),
        "127.0.0.24": ("accepted", "recipient:2"),
        "127.0.0.25": ("changed", "recipient:3"),  # delivered, not discarded
        "127.0.0.28": ("accepted", "score:reject"),
        "127.0.0.29": ("unknown", None),  # DKIM would run now: it needs the body
        "127.0.0.33": ("accepted", "dmarc:reject"),
        "127.0.0.34": ("accepted", "sender:1"),
        "127.0.0.23": ("changed", "recipient:1"),
    }
    # Relay control is never monitored: the relay denial kept its outcome.
    assert "127.0.0.30" not in changes(diff)
    assert diff.live > 0


async def test_a_new_dns_list_zone(recorded: pathlib.Path, dns_server: DnsServer) -> None:
    dns_server.zone("new.bl.test", {"20.0.0.127": {"A": "127.0.0.2"}})
    path = candidate(
        recorded,
        'sites = ["zen.bl.test", "bad.bl.test"]',
        'sites = ["zen.bl.test", "bad.bl.test", "new.bl.test"]',
    )
    diff = await replay_dir(config_of(path), recorded / "capture")
    # Every client the DNS list check looked up asks the new zone: unknown.
    asked = {k for k in diff.unknown_asked if k.startswith("DNS ")}
    assert "DNS 20.0.0.127.new.bl.test/A" in asked
    assert all(k.endswith(".new.bl.test/A") for k in asked)
    assert diff.counts["unknown"] == len(asked) and diff.status == 1
    # Asked live, the one listed client is newly refused, and nothing else changes.
    diff = await replay_dir(config_of(path), recorded / "capture", live=True)
    assert changes(diff) == {"127.0.0.20": ("refused", "dnsbl:new.bl.test")}
    (x,) = diff.listed
    assert x["after"]["stage"] == "rcpt" and x["after"]["code"] == 554
    assert x["before"]["outcome"] == "accepted"
    assert diff.rule_rows() == [
        {
            "rule": "dnsbl:new.bl.test",
            "newly_refused": 1,
            "newly_accepted": 0,
            "changed": 0,
            "clients": 1,
            "sender_domains": 1,
        }
    ]


STATEFUL = """
[ratelimit]
recipients_per_ip = "{limit}/1h"

[greylist]
enabled = true
delay = {delay}
spf_pass_domains = []
"""


async def test_rate_limits_and_greylisting_from_recorded_state(
    gate_factory: GateFactory, dns_server: DnsServer, tmp_path
) -> None:
    directory = tmp_path / "capture"
    extra = STATEFUL.format(limit=10, delay=0.5) + capture_toml(directory)
    gate = await gate_factory(extra)
    a = Send("127.0.0.40", "x@example.org", ("u@example.test", "v@example.test"))
    assert await send(gate, a) == (250, (450, 450), None)  # greylisted: new triplets
    await asyncio.sleep(0.6)
    assert await send(gate, a) == (250, (250, 250), 250)  # retried after the delay
    assert await send(gate, a) == (250, (250, 250), 250)  # remembered as passed
    records = await settled(directory, 3)
    assert [r["end"]["outcome"] for r in records] == ["tempfailed", "accepted", "accepted"]
    hits = [s for s in records[2]["state"] if s["op"] == "hit"]
    assert [h["counts"] for h in hits] == [[5], [6]]  # recipients counted so far

    base = tmp_path / "spamgate-0.toml"
    # Five recipients allowed an hour: the third message's second recipient is the sixth.
    lower = base.read_text().replace('"10/1h"', '"5/1h"')
    diff = await replay_dir(config_of(base, lower), directory)
    assert changes(diff) == {"127.0.0.40": ("changed", "ratelimit:recipients_per_ip")}
    (x,) = diff.listed
    assert x["before"]["recipients"] == [250, 250] and x["after"]["recipients"] == [250, 450]
    # Four: the second message's second recipient (the fourth) is refused, and the
    # third message's first one too (its count includes no refused request).
    four = base.read_text().replace('"10/1h"', '"3/1h"')
    diff = await replay_dir(config_of(base, four), directory)
    after = {x["line"]: x["after"]["recipients"] for x in diff.listed}
    assert after == {2: [250, 450], 3: [450, 450]}

    # A greylisting delay longer than the retry waited (0.6 s): deferred again.
    longer = base.read_text().replace("delay = 0.5", "delay = 60")
    diff = await replay_dir(config_of(base, longer), directory)
    assert changes(diff) == {"127.0.0.40": ("refused", "greylist:early")}
    assert [x["line"] for x in diff.listed] == [2]
    # Without greylisting: the first attempt is let through too.
    off = base.read_text().replace("enabled = true\ndelay", "enabled = false\ndelay")
    diff = await replay_dir(config_of(base, off), directory)
    assert [(x["line"], x["class"], x["rule"]) for x in diff.listed] == [
        (1, "accepted", "greylist:new")
    ]


async def test_command_exit_status_and_formats(recorded: pathlib.Path) -> None:
    capture = str(recorded / "capture")
    same = cli("replay", "-c", str(recorded / "spamgate-0.toml"), capture)
    assert same.returncode == 0, same.stderr
    assert re.search(r"kept their outcome\s+17\b", same.stdout)
    assert "Traceback" not in same.stderr

    path = candidate(recorded, "[dnsbl]", "[scoring]\nreject = 1.5\n\n[dnsbl]")
    text = cli("replay", "-c", str(path), capture)
    assert text.returncode == 1
    assert re.search(r"newly refused\s+1\b", text.stdout)
    assert "score:reject" in text.stdout
    assert "before: accepted 250 2.0.0" in text.stdout
    assert "after:  rejected 550 5.7.1" in text.stdout

    out = cli("replay", "-c", str(path), "--format", "json", capture)
    assert out.returncode == 1
    doc = json.loads(out.stdout)
    assert doc["summary"]["newly_refused"] == 1 and doc["summary"]["kept"] == 16
    assert doc["rules"][0]["rule"] == "score:reject"
    assert doc["transactions_listed"][0]["after"]["outcome"] == "rejected"

    page = recorded / "report.html"
    out = cli("replay", "-c", str(path), "--format", "html", "-o", str(page), capture)
    assert out.returncode == 1 and out.stdout == ""
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<svg" in html
    # Readable offline: nothing fetched from elsewhere, no script.
    assert not re.search(r"<(script|link|img|iframe)\b|\b(src|href)=|@import|url\(", html)
    assert "score:reject" in html and "newly refused" in html


async def test_html_escapes_what_the_capture_says(
    gate_factory: GateFactory, dns_server: DnsServer, tmp_path
) -> None:
    directory = tmp_path / "capture"
    rules = tmp_path / "helo.regexp"
    rules.write_text("/^evil/ REJECT no <b>thanks</b>\n")
    gate = await gate_factory(f'[rules]\nhelo = ["regexp:{rules}"]\n' + capture_toml(directory))
    helo = "evil<script>alert(1)</script>.test"
    assert (await send(gate, Send("127.0.0.41", "x@example.org", helo=helo)))[1] == (554,)
    await settled(directory, 1)
    rules.write_text("")
    diff = cli(
        "replay", "-c", str(tmp_path / "spamgate-0.toml"), "--format", "html", str(directory)
    )
    assert diff.returncode == 1
    assert "<script>" not in diff.stdout and "<b>thanks" not in diff.stdout
    assert "&lt;b&gt;thanks&lt;/b&gt;" in diff.stdout


async def test_report_sums_up_a_capture(
    gate_factory: GateFactory, dns_server: DnsServer, tmp_path
) -> None:
    scripted.publish_dns(dns_server)
    directory = tmp_path / "capture"
    extra = scripted.write_rules(tmp_path) + scripted.DNS_CHECKS + capture_toml(directory)
    gate = await gate_factory(extra)
    for s in TRAFFIC:
        await send(gate, s)
    # Signed and aligned (DKIM and DMARC pass), and still refused: by its score.
    signed = Send("127.0.0.35", "a@spf-pass.test", content=scripted.signed(body("big score")))
    assert await send(gate, signed) == (250, (250,), 550)
    await settled(directory, len(TRAFFIC) + 1)
    r = cli("report", "--format", "json", str(directory))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["transactions"] == len(TRAFFIC) + 1
    rules = {x["rule"]: x["transactions"] for x in doc["top_rules"]}
    assert rules["dnsbl:zen.bl.test"] == 1 and rules["dnsbl:bad.bl.test"] == 1
    assert rules["score:reject"] == 2 and rules["header.regexp:2"] == 2  # the SCORE 20 line
    lists = {x["zone"]: x["transactions"] for x in doc["top_lists"]}
    assert lists == {"bad.bl.test": 2, "zen.bl.test": 1}
    assert doc["would_refuse"] == [
        {"rule": "recipient:4", "transactions": 1, "clients": 1, "passed_dkim_and_dmarc": 0}
    ]
    (refused,) = doc["refused_but_authenticated"]
    assert refused["client"] == "unknown[127.0.0.35]" and refused["rule"] == "score:reject"
    assert refused["reply"] == 550 and refused["domain"] == "spf-pass.test"
    (day,) = doc["days"].values()
    assert day == {
        "accepted": 5,
        "rejected": 11,
        "tempfailed": 1,
        "discarded": 1,
    }
    text = cli("report", str(directory))
    assert "would refuse 1 from 1 client(s); no mail that passed DKIM and DMARC" in text.stdout
    assert "unknown[127.0.0.35]" in text.stdout
