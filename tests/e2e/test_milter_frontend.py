"""spamgate as a Postfix milter: the real Postfix (3.7), real SMTP clients, real checks.

A private Postfix (tests/kit/postfix.py) runs with `smtpd_milters` pointing at a
port on loopback and `milter_default_action = tempfail`; each test starts spamgate
there (`[milter] listen`, beside a proxy listener nobody uses, or alone), with rule
tables and DNS of its own, sends mail to Postfix with a raw SMTP client from a
loopback address outside both mynetworks, and checks what the client heard, what
Postfix delivered, held, discarded or refused, and what spamgate counted. The
same message through spamgate's proxy into a second Postfix (no milter) shows the
two front ends decide and write alike.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from spamgate import metrics
from tests.kit.dnsserver import DnsServer
from tests.kit.postfix import PostfixInstance, free_port
from tests.kit.smtpclient import RawClient, Reply

from ..conftest import GateFactory, PostfixFactory
from .scripted import SIGNER

POSTQUEUE = "/usr/sbin/postqueue"
POSTCAT = "/usr/sbin/postcat"
OUTSIDER = "127.0.0.40"  # outside mynetworks, for Postfix (127.0.0.1/32) and spamgate


def milter_lines(milter: str, *extra: str) -> list[str]:
    return [
        f"smtpd_milters = {milter}",
        "milter_protocol = 6",
        "milter_default_action = tempfail",
        "message_size_limit = 30000000",
        *extra,
    ]


class MilterPostfix:
    """A Postfix whose milter is at `address` (spamgate's `[milter] listen`)."""

    def __init__(self, postfix: PostfixInstance, address: str) -> None:
        self.postfix = postfix
        self.address = address

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def toml(self, **milter: str) -> str:
        lines = [f'listen = ["{self.address}"]']
        if self.address.startswith("unix:"):
            lines.append('socket_group = "postfix"')  # Postfix's smtpd connects
        lines += [f"{k} = {v}" for k, v in milter.items()]
        return "\n[milter]\n" + "\n".join(lines) + "\n"


def milter_address(kind: str) -> str:
    """A TCP port, or a unix socket in a directory Postfix's smtpd may enter (not
    under pytest's tmp_path: only root may enter its parent)."""
    if kind == "inet":
        return f"inet:127.0.0.1:{free_port()}"
    directory = tempfile.mkdtemp(prefix="sg-milter-", dir="/tmp")
    os.chmod(directory, 0o755)
    return f"unix:{directory}/milter.sock"


@pytest.fixture(scope="module", params=["inet", "unix"])
def mp(request: pytest.FixtureRequest, postfix_factory: PostfixFactory) -> Iterator[MilterPostfix]:
    """Over TCP spamgate answers every event; over a unix socket Postfix does not
    wait on connect, HELO, MAIL, header fields, the end of the header and body
    chunks (ops/server.py): the decisions must come out the same."""
    address = milter_address(request.param)
    yield MilterPostfix(postfix_factory(main_extra=milter_lines(address)), address)
    if address.startswith("unix:"):
        shutil.rmtree(os.path.dirname(address[5:]), ignore_errors=True)


RULES = {
    "client.cidr": "127.0.0.66/32  REJECT Your network is listed here, see x.test/66\n",
    "recipient": (
        "reject@example.test   550 5.1.1 No such user here\n"
        "defer@example.test    DEFER Mailbox busy, try later\n"
        "discard@example.test  DISCARD\n"
        "hold@example.test     HOLD\n"
    ),
    "header.regexp": (
        "/^Subject: .*spammy/    SCORE 6 SPAMMY_SUBJECT\n"
        "/^Subject: .*tempfail-me/  SCORE 9 VERY_SPAMMY\n"
        "/^Subject: .*reject-me/ REJECT Subject refused by rule 7\n"
    ),
}


def rules(tmp_path) -> str:
    for name, text in RULES.items():
        (tmp_path / name).write_text(text)
    return (
        "[rules]\n"
        'client = ["cidr:client.cidr"]\n'
        'recipient = ["hash:recipient"]\n'
        'header = ["regexp:header.regexp"]\n'
        "\n[scoring]\ntag = 5.0\ntempfail = 8.0\nreject = 15.0\n"
        "\n[spf]\nenabled = true\n"
        "\n[dkim]\nenabled = true\n"
        "\n[dmarc]\nenabled = true\n"
    )


def publish(dns_server: DnsServer) -> None:
    dns_server.zone(
        "spf-pass.test",
        {
            "@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"},
            SIGNER.name: {"TXT": SIGNER.record},
            "_dmarc": {"TXT": "v=DMARC1; p=reject"},
        },
    )


def marker() -> str:
    return uuid.uuid4().hex


def message(
    mark: str, subject: str = "hello", author: str = "a@spf-pass.test", extra: str = ""
) -> bytes:
    return (
        f"From: {author}\r\nTo: u@example.test\r\nSubject: {subject} {mark}\r\n"
        f"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <{mark}@spf-pass.test>\r\n"
        f"{extra}\r\nHello {mark}\r\n"
    ).encode()


async def send(
    port: int,
    body: bytes,
    *,
    source: str = OUTSIDER,
    sender: str = "a@spf-pass.test",
    rcpts: tuple[str, ...] = ("u@example.test",),
) -> list[Reply]:
    c, banner = await RawClient.connect(port, source=source)
    assert banner is not None and banner.code == 220, banner
    replies = await c.mail(sender, list(rcpts), body, helo="client.example.test")
    await c.cmd("QUIT")
    await c.close()
    return replies


def queue_id(reply: Reply) -> str:
    match = re.search(r"queued as ([0-9A-Za-z]+)", reply.text)
    assert match, f"no queue id in {reply}"
    return match.group(1)


def postqueue(postfix: PostfixInstance) -> list[dict]:
    out = subprocess.run(
        [POSTQUEUE, "-c", str(postfix.etc), "-j"], capture_output=True, text=True, check=True
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def header_names(raw: bytes) -> list[str]:
    head = raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode()
    return [line.split(":", 1)[0] for line in head.splitlines() if not line[:1].isspace()]


def parsed(raw: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(raw, policy=email.policy.default)  # type: ignore[return-value]


def value(counter, *labels: str) -> float:
    return counter.labels(*labels)._value.get()


@pytest.fixture
async def milter_gate(
    gate_factory: GateFactory, dns_server: DnsServer, mp: MilterPostfix, tmp_path
):
    publish(dns_server)

    async def start(extra: str = "", **kwargs):
        return await gate_factory(rules(tmp_path) + mp.toml() + extra, **kwargs)

    return start


# -- clean mail, and the same decisions as the proxy's -------------------------------------


async def test_clean_mail_delivered_with_our_headers(milter_gate, mp: MilterPostfix) -> None:
    await milter_gate()
    mark = marker()
    before = value(metrics.TRANSACTIONS, "milter", "accepted")
    replies = await send(mp.postfix.port, SIGNER.sign(message(mark)))
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    raw = await asyncio.to_thread(mp.postfix.wait_delivered, mark.encode())
    names = header_names(raw)
    # Postfix's Received on top of ours, as when the proxy relays to Postfix
    start = names.index("Received")
    assert names[start : start + 2] == ["Received", "Authentication-Results"]
    msg = parsed(raw)
    (ar,) = msg.get_all("Authentication-Results")
    assert str(ar).startswith("gate.test;")
    for result in ("spf=pass", "dkim=pass", "dmarc=pass"):
        assert result in str(ar), ar
    assert "X-Spam-Score" not in msg
    assert value(metrics.TRANSACTIONS, "milter", "accepted") == before + 1


async def test_milter_and_proxy_write_the_same_message(
    milter_gate, mp: MilterPostfix, postfix_factory: PostfixFactory
) -> None:
    """One configuration, one message, both front ends: the same score, the same
    fields in the same places (below Postfix's Received), the same values."""
    plain = postfix_factory()
    gate = await milter_gate(up={"address": f'"{plain.address}"'})
    results = {}
    mark = marker()
    signed = SIGNER.sign(message(mark, subject="spammy"))
    for name, port, postfix in (
        ("milter", mp.postfix.port, mp.postfix),
        ("proxy", gate.port, plain),
    ):
        replies = await send(port, signed)
        assert replies[-1].code == 250, (name, replies)
        raw = await asyncio.to_thread(postfix.wait_delivered, mark.encode())
        names = header_names(raw)
        ours = names[names.index("Received") + 1 : names.index("DKIM-Signature")]
        msg = parsed(raw)
        fields = [(n, str(msg[n])) for n in ours]
        results[name] = fields
    assert [n for n, _ in results["milter"]] == [
        "Authentication-Results",
        "X-Spam-Flag",
        "X-Spam-Score",
        "X-Spam-Symbols",
    ]
    assert results["milter"] == results["proxy"]
    assert ("X-Spam-Score", "6.0") in results["milter"]


# -- refusals ----------------------------------------------------------------------------


async def test_rule_refusals_reach_the_client_in_our_words(milter_gate, mp: MilterPostfix) -> None:
    await milter_gate()
    before = value(metrics.VERDICTS, "rcpt", "recipient", "reject")
    c, _ = await RawClient.connect(mp.postfix.port, source=OUTSIDER)
    assert (await c.cmd("EHLO client.example.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@spf-pass.test>")).code == 250
    r = await c.cmd("RCPT TO:<reject@example.test>")
    assert str(r) == (
        "550 5.1.1 <reject@example.test>: Recipient address rejected: "
        "No such user here (recipient:1)"
    )
    r = await c.cmd("RCPT TO:<defer@example.test>")
    assert r.code == 450 and r.enhanced == "4.7.1" and "Mailbox busy, try later" in r.text
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(message(marker(), subject="reject-me") + b".\r\n")
    r = await c.reply()
    assert r.code == 550 and "Subject refused by rule 7" in r.text, r
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    assert value(metrics.VERDICTS, "rcpt", "recipient", "reject") == before + 1
    await asyncio.to_thread(
        mp.postfix.wait_log, r"milter-reject: RCPT from .*127\.0\.0\.40.*No such user here"
    )


async def test_a_message_too_big_is_refused_at_its_end_and_none_is_lost(
    milter_gate, mp: MilterPostfix
) -> None:
    """Too big in its header or its body: refused at the client's final dot (over a
    unix socket Postfix does not wait on the end of the header or body chunks, so
    that is where spamgate answers), nothing queued, and the next message on the
    same connection goes through: no answer is left over to confuse the next one."""
    await milter_gate("\n[limits]\nheader_size = 4000\nmessage_size = 30000\n")
    big_header, big_body, good = marker(), marker(), marker()
    pad = "".join(f"X-Pad-{i}: {'h' * 900}\r\n" for i in range(6))
    c, _ = await RawClient.connect(mp.postfix.port, source=OUTSIDER)
    first = await c.mail("a@spf-pass.test", ["u@example.test"], message(big_header, extra=pad))
    assert first[-1].code == 552 and first[-1].enhanced == "5.3.4", first[-1]
    body = message(big_body) + b"".join(b"%05d %s\r\n" % (i, b"b" * 900) for i in range(40))
    assert len(body) > 30000
    for command in ("MAIL FROM:<a@spf-pass.test>", "RCPT TO:<u@example.test>", "DATA"):
        assert (await c.cmd(command)).code in (250, 354)
    await c.send(body + b".\r\n")
    second = await c.reply()
    assert second.code == 552 and second.enhanced == "5.3.4", second
    for command in ("MAIL FROM:<a@spf-pass.test>", "RCPT TO:<u@example.test>", "DATA"):
        assert (await c.cmd(command)).code in (250, 354)
    await c.send(message(good) + b".\r\n")
    assert (await c.reply()).code == 250
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    raw = await asyncio.to_thread(mp.postfix.wait_delivered, good.encode())
    assert len(parsed(raw).get_all("Authentication-Results")) == 1
    log = await asyncio.to_thread(
        mp.postfix.wait_log, rf"milter-reject: END-OF-MESSAGE.*{OUTSIDER}"
    )
    assert log is not None
    delivered = await asyncio.to_thread(mp.postfix.delivered)
    assert not [m for m in delivered if big_header.encode() in m or big_body.encode() in m]
    assert not [q for q in postqueue(mp.postfix) if q]


async def test_connect_refusal_is_delayed_to_rcpt(milter_gate, mp: MilterPostfix) -> None:
    """A client rule refuses at connect; Postfix would word that itself, so the
    refusal is given at RCPT ([smtp] delay_reject), with the rule's text."""
    await milter_gate()
    c, banner = await RawClient.connect(mp.postfix.port, source="127.0.0.66")
    assert banner.code == 220
    assert (await c.cmd("EHLO client.example.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@spf-pass.test>")).code == 250
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert r.code == 554 and "Your network is listed here, see x.test/66" in r.text, r
    await c.close()


async def test_score_tempfail(milter_gate, mp: MilterPostfix) -> None:
    await milter_gate()
    replies = await send(mp.postfix.port, message(marker(), subject="tempfail-me"))
    assert replies[-1].code == 451 and replies[-1].enhanced == "4.7.1", replies[-1]


async def test_discard(milter_gate, mp: MilterPostfix) -> None:
    await milter_gate()
    mark = marker()
    before = value(metrics.TRANSACTIONS, "milter", "discarded")
    replies = await send(mp.postfix.port, message(mark), rcpts=("discard@example.test",))
    assert replies[-1].code == 250
    qid = queue_id(replies[-1])
    await asyncio.to_thread(mp.postfix.wait_log, rf"{qid}: milter-discard: END-OF-MESSAGE")
    assert value(metrics.TRANSACTIONS, "milter", "discarded") == before + 1
    await asyncio.sleep(0.3)
    assert not any(mark.encode() in m for m in mp.postfix.delivered())


async def test_hold_goes_to_postfix_hold_queue_with_our_headers(
    milter_gate, mp: MilterPostfix
) -> None:
    await milter_gate()
    mark = marker()
    replies = await send(mp.postfix.port, message(mark), rcpts=("hold@example.test",))
    assert replies[-1].code == 250
    qid = queue_id(replies[-1])
    await asyncio.to_thread(mp.postfix.wait_log, rf"{qid}: milter-hold: END-OF-MESSAGE")
    held = [m for m in await asyncio.to_thread(postqueue, mp.postfix) if m["queue_id"] == qid]
    assert len(held) == 1 and held[0]["queue_name"] == "hold"
    content = subprocess.run(
        [POSTCAT, "-c", str(mp.postfix.etc), "-bh", "-q", qid], capture_output=True, text=True
    ).stdout
    assert "Authentication-Results: gate.test;" in content and mark in content
    assert not any(mark.encode() in m for m in mp.postfix.delivered())


async def test_forged_authentication_results_removed(milter_gate, mp: MilterPostfix) -> None:
    await milter_gate()
    mark = marker()
    forged = (
        "Authentication-Results: gate.test; spf=pass smtp.mailfrom=a@bank.test\r\n"
        "Authentication-Results: other.test; spf=pass smtp.mailfrom=a@x.test\r\n"
        "authentication-results: GATE.TEST; dkim=pass header.d=bank.test\r\n"
        "Authentication-Results: (comment) gate.test.; dmarc=pass\r\n"
    )
    replies = await send(mp.postfix.port, message(mark, extra=forged))
    assert replies[-1].code == 250
    raw = await asyncio.to_thread(mp.postfix.wait_delivered, mark.encode())
    values = [str(v) for v in parsed(raw).get_all("Authentication-Results")]
    assert len(values) == 2, values
    assert values[0].startswith("gate.test;") and "spf=pass" in values[0]
    assert values[1] == "other.test; spf=pass smtp.mailfrom=a@x.test"
    assert b"bank.test" not in raw


# -- sessions ----------------------------------------------------------------------------


async def test_two_messages_and_an_aborted_transaction(milter_gate, mp: MilterPostfix) -> None:
    await milter_gate()
    marks = [marker(), marker()]
    counts = {o: value(metrics.TRANSACTIONS, "milter", o) for o in ("accepted", "aborted")}
    sessions = value(metrics.SESSIONS, "milter")
    c, _ = await RawClient.connect(mp.postfix.port, source=OUTSIDER)
    first = await c.mail("a@spf-pass.test", ["u@example.test"], message(marks[0]))
    assert first[-1].code == 250
    assert (await c.cmd("MAIL FROM:<b@spf-pass.test>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("RSET")).code == 250
    second = await c.mail("c@spf-pass.test", ["u@example.test"], message(marks[1]))
    assert second[-1].code == 250
    assert (await c.cmd("QUIT")).code == 221
    await c.close()
    for mark in marks:
        await asyncio.to_thread(mp.postfix.wait_delivered, mark.encode())
    await asyncio.sleep(0.2)
    assert value(metrics.TRANSACTIONS, "milter", "accepted") == counts["accepted"] + 2
    assert value(metrics.TRANSACTIONS, "milter", "aborted") == counts["aborted"] + 1
    assert value(metrics.SESSIONS, "milter") == sessions + 1
    assert value(metrics.SESSIONS_ACTIVE, "milter") == 0


async def test_pipelined_clients(milter_gate, mp: MilterPostfix) -> None:
    """PIPELINING (RFC 2920): the whole envelope in one write, the replies in order;
    and many clients at once, each told and delivered as its own session."""
    await milter_gate()
    mark = marker()
    c, _ = await RawClient.connect(mp.postfix.port, source=OUTSIDER)
    ehlo = await c.cmd("EHLO client.example.test")
    assert "PIPELINING" in ehlo.lines
    await c.send(
        b"MAIL FROM:<a@spf-pass.test>\r\nRCPT TO:<reject@example.test>\r\n"
        b"RCPT TO:<u@example.test>\r\nRCPT TO:<defer@example.test>\r\nDATA\r\n"
    )
    replies = [await c.reply() for _ in range(5)]
    assert [r.code for r in replies] == [250, 550, 250, 450, 354]
    await c.send(message(mark) + b".\r\nQUIT\r\n")
    assert (await c.reply()).code == 250
    assert (await c.reply()).code == 221
    await c.close()
    await asyncio.to_thread(mp.postfix.wait_delivered, mark.encode())

    marks = [marker() for _ in range(12)]
    results = await asyncio.gather(
        *(
            send(mp.postfix.port, message(m), source=f"127.0.0.{50 + i}")
            for i, m in enumerate(marks)
        )
    )
    assert all(r[-1].code == 250 for r in results)
    for m in marks:
        raw = await asyncio.to_thread(mp.postfix.wait_delivered, m.encode())
        assert len(parsed(raw).get_all("Authentication-Results")) == 1


async def test_monitor_mode_refuses_nothing(milter_gate, mp: MilterPostfix) -> None:
    await milter_gate(server={"mode": '"monitor"'})
    before = value(metrics.WOULD_VERDICTS, "rcpt", "recipient", "reject")
    mark = marker()
    replies = await send(
        mp.postfix.port, message(mark, subject="reject-me"), rcpts=("reject@example.test",)
    )
    assert replies[-1].code == 250
    await asyncio.to_thread(mp.postfix.wait_delivered, mark.encode())
    assert value(metrics.WOULD_VERDICTS, "rcpt", "recipient", "reject") == before + 1


async def test_milter_alone(gate_factory, dns_server, mp: MilterPostfix, tmp_path) -> None:
    """No proxy listener at all: the milter is spamgate's only front end."""
    publish(dns_server)
    gate = await gate_factory(rules(tmp_path) + mp.toml(), server={"listen": "[]"})
    assert gate.server.servers == [] and gate.server.milter is not None
    replies = await send(mp.postfix.port, message(marker()), rcpts=("reject@example.test",))
    assert replies[2].code == 550 and "No such user here" in replies[2].text


# -- capture and replay --------------------------------------------------------------------


async def test_milter_sessions_are_recorded_and_replayed(
    milter_gate, mp: MilterPostfix, tmp_path
) -> None:
    """Sessions through Postfix and the milter are captured as the proxy's are: the
    running configuration replays them unchanged, and a candidate's changes are
    put down to the rules that made them."""
    from .capturekit import capture_toml, changes, config_of, replay_dir, settled

    directory = tmp_path / "capture"
    # bodies kept: a candidate that lets a refused message on runs DKIM on it
    await milter_gate(capture_toml(directory, store_messages="true"))
    sent = [
        ("127.0.0.41", message(marker()), ("u@example.test",)),
        ("127.0.0.42", message(marker(), subject="spammy"), ("u@example.test",)),
        ("127.0.0.43", message(marker(), subject="reject-me"), ("u@example.test",)),
        ("127.0.0.44", message(marker()), ("reject@example.test", "u@example.test")),
    ]
    got = []
    for source, body, rcpts in sent:
        replies = await send(mp.postfix.port, body, source=source, rcpts=rcpts)
        got.append([r.code for r in replies[1:]])
    assert got == [
        [250, 250, 354, 250],
        [250, 250, 354, 250],
        [250, 250, 354, 550],
        [250, 550, 250, 354, 250],
    ]
    records = await settled(directory, len(sent))
    assert len(records) == len(sent)
    assert {r["client"]["address"] for r in records} == {s[0] for s in sent}

    config = config_of(tmp_path / "spamgate-0.toml")
    diff = await replay_dir(config, directory)
    assert diff.total == len(sent) and dict(diff.counts) == {"kept": len(sent)}, diff.listed
    assert diff.status == 0

    (tmp_path / "header.regexp").write_text(
        "/^Subject: .*spammy/    REJECT Spammy subjects refused\n"
        "/^Subject: .*tempfail-me/  SCORE 9 VERY_SPAMMY\n"
    )
    (tmp_path / "recipient").write_text("hold@example.test     HOLD\n")
    candidate = config_of(tmp_path / "spamgate-0.toml")
    diff = await replay_dir(candidate, directory)
    # the header rule's REJECT ended the stage: DMARC never asked for its record
    # (answered with --live-dns below)
    assert changes(diff) == {
        "127.0.0.42": ("refused", "header.regexp:1"),
        "127.0.0.43": ("unknown", None),
        "127.0.0.44": ("changed", "recipient:1"),
    }
    assert diff.status == 1
    diff = await replay_dir(candidate, directory, live=True)
    assert changes(diff) == {
        "127.0.0.42": ("refused", "header.regexp:1"),
        "127.0.0.43": ("accepted", "header.regexp:3"),
        "127.0.0.44": ("changed", "recipient:1"),
    }
