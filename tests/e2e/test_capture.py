"""[capture]: what a record holds, recorded from real sessions through the proxy.

Client facts (address, verified name, HELO, TLS, the AUTH login), the envelope with
each recipient's reply and who gave it, every DNS answer the checks received (SPF's
remembered results included), the state store's answers, every verdict, the end;
headers bounded, bodies only with store_messages; keyed hashes with redact. A
full disk (here: below min_free) stops the capture and never the mail.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import stat

import pytest

from spamgate import metrics
from spamgate.app import build, loads
from spamgate.explain import explain
from tests.e2e import scripted
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

from ..conftest import GateFactory, config_text
from .capturekit import Send, body, capture_toml, cli, lines, send, settled

USER, PASSWORD = "alice@example.test", "correct horse battery staple"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_a_record_holds_what_the_checks_used_and_decided(
    gate_factory: GateFactory, dns_server: DnsServer, sink: Sink, tmp_path
) -> None:
    scripted.publish_dns(dns_server)
    dns_server.zone("example.test", {"mx": {"A": "127.0.0.20"}})
    dns_server.zone("127.in-addr.arpa", {"20.0.0": {"PTR": "mx.example.test."}})
    directory = tmp_path / "capture"
    extra = scripted.write_rules(tmp_path) + scripted.DNS_CHECKS + capture_toml(directory)
    gate = await gate_factory(extra)
    signed = scripted.signed(body("clean"))
    s = Send("127.0.0.20", "a@spf-pass.test", ("u@example.test", "x@elsewhere.test"), signed)
    assert await send(gate, s) == (250, (250, 554), 250)
    (rec,) = await settled(directory, 1)
    assert rec["v"] == 1 and rec["n"] == 1 and rec["sid"]
    client = rec["client"]
    assert client["address"] == "127.0.0.20" and client["name"] == "mx.example.test"
    assert client["helo"] == [["client.example.test", True, None]]
    assert rec["mail"] == {
        "from": "a@spf-pass.test",
        "params": [],
        "keywords": {},
        "reply": [250, "2.1.0", ["Ok"]],
        "by": "upstream",
    }
    assert [(r["to"], r["reply"][0], r["by"]) for r in rec["rcpt"]] == [
        ("u@example.test", 250, "upstream"),
        ("x@elsewhere.test", 554, "us"),
    ]
    assert rec["end"]["outcome"] == "accepted" and rec["end"]["by"] == "upstream"
    assert rec["end"]["reply"][0] == 250
    # Every answer the checks received, with its TTL: the lists, SPF, DKIM, DMARC.
    dns = {(d[0], d[1]): d[2:] for d in rec["dns"]}
    assert dns[("20.0.0.127.zen.bl.test", "A")][0] == "nxdomain"
    assert dns[("spf-pass.test", "TXT")] == ["answer", 5, [["v=spf1 ip4:127.0.0.0/8 -all"]]]
    key = dns[("sel._domainkey.spf-pass.test", "TXT")]
    assert key[0] == "answer" and "".join(key[2][0]) == scripted.SIGNER.record
    assert dns[("_dmarc.spf-pass.test", "TXT")][2] == [["v=DMARC1; p=reject"]]
    assert rec["auth"] == {
        "spf_helo": "none",
        "spf": "pass",
        "dkim": [["pass", "spf-pass.test"]],
        "dmarc": "pass",
        "dmarc_dkim_aligned": True,
        "dmarc_spf_aligned": True,
    }
    verdicts = [(v["stage"], v["entry"], v["action"]) for v in rec["verdicts"]]
    assert ("connect", "dnsbl", "dunno") in verdicts
    assert ("rcpt", "relay", "reject") in verdicts
    assert ("eod", "dkim", "dunno") in verdicts
    (dkim,) = [v for v in rec["verdicts"] if v["entry"] == "dkim"]
    assert dkim["result"]["@type"] == "DkimResults"
    assert dkim["counted"] == [["spamgate_auth_results_total", ["dkim", "pass"]]]
    # The message: its header section, size and digest, not its body.
    message = rec["message"]
    assert message["size"] == len(signed) and "body" not in message
    head, _, rest = signed.partition(b"\r\n\r\n")
    assert message["headers"] == (head + b"\r\n\r\n").decode()
    assert message["sha256"] == hashlib.sha256(rest).hexdigest()


async def test_spf_remembered_results_still_record_their_answers(
    gate_factory: GateFactory, dns_server: DnsServer, tmp_path
) -> None:
    scripted.publish_dns(dns_server)
    directory = tmp_path / "capture"
    gate = await gate_factory("[spf]\nenabled = true\n" + capture_toml(directory))
    for _ in range(2):
        assert (await send(gate, Send("127.0.0.20", "a@spf-pass.test")))[2] == 250
    first, second = await settled(directory, 2)
    assert dns_server.count("spf-pass.test", "TXT") == 1  # the second one was remembered
    for rec in (first, second):
        assert ["spf-pass.test", "TXT", "answer"] in [d[:3] for d in rec["dns"]]
        assert rec["auth"]["spf"] == "pass"


async def test_sessions_transactions_and_refusals_before_mail(
    gate_factory: GateFactory, tmp_path
) -> None:
    directory = tmp_path / "capture"
    (tmp_path / "client.cidr").write_text("127.0.0.9/32 REJECT go away\n")
    extra = f'[rules]\nclient = ["cidr:{tmp_path}/client.cidr"]\n[smtp]\ndelay_reject = false\n'
    gate = await gate_factory(extra + capture_toml(directory))
    c, banner = await gate.client(source="127.0.0.9", greet=True)
    assert banner is not None and banner.code == 554
    await c.cmd("QUIT")
    await c.close()
    c, _ = await gate.client(source="127.0.0.5")
    await c.cmd("EHLO one.example.test")
    for sender in ("a@example.org", "b@example.org"):
        await c.cmd(f"MAIL FROM:<{sender}>")
        await c.cmd("RCPT TO:<u@example.test>")
        await c.cmd("RSET")
    await c.cmd("EHLO two.example.test")
    await c.cmd("MAIL FROM:<c@example.org> SIZE=100")
    await c.cmd("QUIT")
    await c.close()
    c, _ = await gate.client(source="127.0.0.6")  # says nothing, then leaves: no record
    await c.cmd("QUIT")
    await c.close()
    records = await settled(directory, 4)
    assert len(records) == 4
    refused, one, two, three = records
    assert refused["n"] == 0 and "mail" not in refused
    assert refused["connect"][0] == 554 and refused["end"]["outcome"] == "rejected"
    assert [v["entry"] for v in refused["verdicts"]] == ["client.cidr"]
    assert (one["n"], two["n"], three["n"]) == (1, 2, 3)
    assert one["sid"] == two["sid"] == three["sid"] != refused["sid"]
    assert [r["end"]["outcome"] for r in (one, two, three)] == ["aborted"] * 3
    assert one["client"]["helo"] == [["one.example.test", True, None]]
    assert three["client"]["helo"] == [
        ["one.example.test", True, None],
        ["two.example.test", True, None],
    ]
    assert three["mail"]["keywords"] == {"SIZE": "100"}
    assert three["mail"]["params"] == ["SIZE=100"]
    assert "rcpt" in three and three["rcpt"] == []


async def test_tls_and_auth_facts(gate_factory: GateFactory, sink: Sink, tls_files, tmp_path):
    sink.behaviour.accounts = {USER: PASSWORD}
    directory = tmp_path / "capture"
    gate = await gate_factory(
        tls_files.toml + capture_toml(directory), server={"auth_passthrough": "true"}
    )
    c, _ = await gate.client(source="127.0.0.5")
    await c.cmd("EHLO plain.example.test")
    await c.starttls(tls_files.client_context())
    await c.cmd("EHLO secure.example.test")
    assert (await c.cmd(f"AUTH PLAIN {PLAIN}")).code == 235
    assert (await c.cmd("MAIL FROM:<alice@example.test>")).code == 250
    assert (await c.cmd("RCPT TO:<friend@elsewhere.test>")).code == 250  # relays: AUTH
    assert (await c.cmd("DATA")).code == 354
    await c.send(body() + b".\r\n")
    assert (await c.reply()).code == 250
    await c.cmd("QUIT")
    (rec,) = await settled(directory, 1)
    client = rec["client"]
    assert client["helo"] == [["secure.example.test", True, None]]  # the one after TLS
    assert client["tls"]["version"] in ("TLSv1.2", "TLSv1.3") and client["tls"]["cipher"]
    assert client["login"] == USER
    assert "AUTH" not in str(rec["mail"]) and PASSWORD not in str(rec)


async def test_headers_are_bounded_and_bodies_kept_only_when_asked(
    gate_factory: GateFactory, tmp_path
) -> None:
    directory = tmp_path / "capture"
    settings = {"store_messages": "true", "message_size": "2000", "header_size": "200"}
    gate = await gate_factory(capture_toml(directory, **settings))
    small = body("small")
    long_header = b"X-Long: " + b"x" * 300 + b"\r\n" + body("long")
    large = body("large") + (b"y" * 70 + b"\r\n") * 50
    for i, content in enumerate((small, long_header, large)):
        sent = await send(gate, Send(f"127.0.0.{50 + i}", "a@example.org", content=content))
        assert sent[2] == 250
    one, two, three = await settled(directory, 3)
    assert base64.b64decode(one["message"]["body"]) == small.partition(b"\r\n\r\n")[2]
    assert "headers_cut" not in one["message"]
    assert two["message"]["headers_cut"] is True and len(two["message"]["headers"]) <= 200
    assert "body" not in two["message"]  # a cut header is not a message to replay whole
    assert "body" not in three["message"] and three["message"]["size"] == len(large)
    assert three["message"]["sha256"] == hashlib.sha256(large.partition(b"\r\n\r\n")[2]).hexdigest()


async def test_redact_hashes_local_parts_with_a_kept_key(
    gate_factory: GateFactory, tmp_path
) -> None:
    directory = tmp_path / "capture"
    extra = '[ratelimit]\nmessages_per_recipient = "100/1h"\n'
    gate = await gate_factory(extra + capture_toml(directory, redact="true"))
    content = b"From: Alice <alice.smith@example.org>\r\nTo: u@example.test\r\n\r\nhi\r\n"
    for _ in range(2):
        s = Send("127.0.0.5", "alice.smith@example.org", ("u@example.test",), content)
        assert (await send(gate, s))[2] == 250
    one, two = await settled(directory, 2)
    text = str(one)
    assert "alice.smith" not in text and "u@example.test" not in text
    assert one["redacted"] is True
    sender = one["mail"]["from"]
    assert sender.endswith("@example.org") and sender.startswith("h") and len(sender) == 29
    assert two["mail"]["from"] == sender  # the same address, the same hash
    assert f"<{sender}>" in one["message"]["headers"]
    (hit,) = [s for s in one["state"] if s["op"] == "hit"]
    assert hit["windows"][0][0].endswith(":*@example.test")  # local part gone from the key
    key = directory / "redact.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


def test_redact_and_store_messages_exclude_each_other(tmp_path) -> None:
    text = config_text(None, capture_toml(tmp_path, redact="true", store_messages="true"))
    with pytest.raises(Exception, match="redact and store_messages exclude each other"):
        loads(text, str(tmp_path / "c.toml"))


async def test_below_min_free_the_capture_stops_and_the_mail_goes_on(
    gate_factory: GateFactory, sink: Sink, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "capture"
    stops = value("spamgate_capture_stops_total", reason="min_free")
    dropped = value("spamgate_capture_records_total", result="dropped")
    huge = str(2**62)  # more bytes than any disk has free: as good as a full disk
    gate = await gate_factory(capture_toml(directory, min_free=huge))
    with caplog.at_level(logging.ERROR, logger="spamgate.capture"):
        for i in range(3):
            assert await send(gate, Send(f"127.0.0.{60 + i}", "a@example.org")) == (
                250,
                (250,),
                250,
            )
        for _ in range(250):  # each record is dropped, at once or in the writer's round
            if value("spamgate_capture_records_total", result="dropped") >= dropped + 3:
                break
            await asyncio.sleep(0.02)
    assert len(sink.messages) == 3  # the mail went through
    assert value("spamgate_capture_stops_total", reason="min_free") == stops + 1
    assert value("spamgate_capture_active") == 0
    assert value("spamgate_capture_records_total", result="dropped") == dropped + 3
    assert "capture stopped (min_free)" in caplog.text and "mail is not affected" in caplog.text
    assert caplog.text.count("capture stopped") == 1  # said once, not per message
    assert lines(directory) == []


async def test_records_made_in_one_batch_and_kept_at_shutdown(
    gate_factory: GateFactory, sink: Sink, tmp_path
) -> None:
    directory = tmp_path / "capture"
    gate = await gate_factory(capture_toml(directory))
    sent = [Send(f"127.0.0.{70 + i}", f"s{i}@example.org") for i in range(5)]
    results = await asyncio.gather(*(send(gate, s) for s in sent))
    assert results == [(250, (250,), 250)] * 5
    # Stopped at once, within the batch's wait: the waiting records are made and
    # written before the capture closes, none lost.
    await gate.stop()
    found = lines(directory)
    assert sorted(r["mail"]["from"] for r in found) == sorted(s.sender for s in sent)
    assert len(sink.messages) == 5


def test_capture_is_off_by_default(tmp_path) -> None:
    built = build(loads(config_text(None), str(tmp_path / "c.toml")))
    assert built.capture is None
    assert type(built.services.resolver).__name__ == "DnsResolver"


def test_spamgate_check_names_an_unwritable_capture_directory(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = tmp_path / "spamgate.toml"
    path.write_text(config_text(None, capture_toml(blocker / "capture")))
    r = cli("check", "-c", str(path))
    assert r.returncode == 1
    assert f"{path}:" in r.stdout and "[capture] directory" in r.stdout
    assert "cannot be written" in r.stdout


async def test_explain_never_records(tmp_path) -> None:
    directory = tmp_path / "capture"
    config = loads(config_text(None, capture_toml(directory)), str(tmp_path / "c.toml"))
    out = io.StringIO()
    status = await explain(
        config,
        client_ip="192.0.2.1",
        client_name="mx.example.net",
        helo="mx.example.net",
        sender="a@example.net",
        recipients=["u@example.test"],
        message=None,
        out=out,
    )
    assert status == 0 and not directory.exists()
