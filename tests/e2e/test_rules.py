"""Rule tables at every stage, over real sockets: replies, delayed reject, scores, monitor."""

from __future__ import annotations

import base64
import logging

import pytest

from tests.kit.sink import Sink

from ..conftest import GateFactory
from ..conftest import sample as metric

BODY = b"Subject: test\r\nFrom: a@example.org\r\n\r\nHello\r\n"


@pytest.fixture
def write(tmp_path):
    def write(name: str, text: str) -> None:
        (tmp_path / name).write_text(text)

    return write


async def transaction(gate, rcpts=("u@example.test",), body=BODY, helo="c.example.test"):
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", list(rcpts), body, helo=helo)
    return c, replies


# ---- each action's reply over the wire ----------------------------------------------


@pytest.mark.parametrize(
    ("action", "code", "text"),
    [
        ("REJECT", 554, "5.7.1 <u@example.test>: Recipient address rejected: Access denied"),
        (
            "REJECT No such user here",
            554,
            "5.7.1 <u@example.test>: Recipient address rejected: No such user here",
        ),
        ("DEFER", 450, "4.7.1 <u@example.test>: Recipient address rejected: Access denied"),
        ("550 5.1.1 Gone", 550, "5.1.1 <u@example.test>: Recipient address rejected: Gone"),
        ("452 Full", 452, "4.7.1 <u@example.test>: Recipient address rejected: Full"),
    ],
)
async def test_refusals_at_rcpt(
    gate_factory: GateFactory, sink: Sink, write, action: str, code: int, text: str
) -> None:
    write("recipient", f"# users\nu@example.test {action}\n")
    gate = await gate_factory('[rules]\nrecipient = ["hash:recipient"]\n')
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert (r.code, r.text) == (code, f"{text} (recipient:2)")
    assert "/" not in r.text  # no path in the reply, only the table's name
    assert (await c.cmd("RCPT TO:<other@example.test>")).code == 250
    assert not any("u@example.test" in cmd for cmd in sink.commands)


@pytest.mark.parametrize("code", [421, 521])
async def test_disconnect_actions(gate_factory: GateFactory, sink: Sink, write, code: int) -> None:
    write("recipient", f"u@example.test {code} Too much\n")
    gate = await gate_factory('[rules]\nrecipient = ["hash:recipient"]\n')
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert r.code == code and r.text.endswith("Too much (recipient:1)")
    assert await c.closed()


async def test_ok_skips_the_remaining_tables_of_the_stage(gate_factory: GateFactory, write) -> None:
    write("first", "u@example.test OK\n")
    write("second", "example.test REJECT\n")
    gate = await gate_factory('[rules]\nrecipient = ["hash:first", "hash:second"]\n')
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    r = await c.cmd("RCPT TO:<v@example.test>")
    assert r.code == 554 and r.text.endswith("(second:1)")


async def test_dunno_warn_prepend_go_on_to_the_next_table(
    gate_factory: GateFactory, sink: Sink, write, caplog
) -> None:
    caplog.set_level(logging.INFO)
    write("a", "a@example.org DUNNO\n")
    write("b", "a@example.org WARN sender seen\n")
    write("c", "example.org PREPEND X-Sender-Note: from $1 example.org\n")
    write("d", "a@example.org SCORE 1 SEEN\n")
    gate = await gate_factory(
        '[rules]\nsender = ["hash:a", "hash:b", "hash:c", "hash:d"]\n[scoring]\ntag = 1\n'
    )
    _, replies = await transaction(gate)
    assert replies[-1].code == 250
    content = sink.messages[0].original
    assert content.startswith(
        b"X-Sender-Note: from $1 example.org\r\nX-Spam-Flag: YES\r\nX-Spam-Score: 1.0\r\n"
        b"X-Spam-Symbols: SEEN\r\n"
    )
    assert "warn: b: sender seen (rule b:1)" in caplog.text


async def test_discard_and_hold(gate_factory: GateFactory, sink: Sink, write, tmp_path) -> None:
    write("recipient", "trap@example.test DISCARD spam trap\nhold@example.test HOLD\n")
    gate = await gate_factory('[rules]\nrecipient = ["hash:recipient"]\n')
    before = metric("spamgate_transactions_total", frontend="proxy", outcome="discarded")
    _, replies = await transaction(gate, rcpts=["trap@example.test"])
    assert replies[-1].code == 250  # the client is told it went well
    assert sink.messages == []
    after = metric("spamgate_transactions_total", frontend="proxy", outcome="discarded")
    assert after == before + 1
    _, replies = await transaction(gate, rcpts=["hold@example.test"])
    assert replies[-1].code == 250
    assert sink.messages == []
    held = list((tmp_path / "spamgate-quarantine" / "new").iterdir())
    assert len(held) == 1 and held[0].read_bytes().endswith(BODY)


async def test_rule_hits_are_counted_by_table_and_line(gate_factory: GateFactory, write) -> None:
    write("sender", "# x\nother@example.org OK\na@example.org SCORE 1 X\n")
    gate = await gate_factory('[rules]\nsender = ["hash:sender"]\n')
    before = metric("spamgate_rule_hits_total", table="sender", rule="3")
    await transaction(gate)
    assert metric("spamgate_rule_hits_total", table="sender", rule="3") == before + 1


# ---- stages and delayed reject ---------------------------------------------------------


async def test_helo_rejection_is_delayed_to_rcpt(
    gate_factory: GateFactory, sink: Sink, write, caplog
) -> None:
    caplog.set_level(logging.INFO)
    write("helo.regexp", "/^${myhostname}$/ REJECT You are not me\n")
    gate = await gate_factory('[rules]\nhelo = ["regexp:helo.regexp"]\n')
    c, _ = await gate.client()
    assert (await c.cmd("EHLO GATE.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert (r.code, r.text) == (
        554,
        "5.7.1 <GATE.test>: Helo command rejected: You are not me (helo.regexp:1)",
    )
    assert sink.connections == 0  # nothing went upstream
    await c.cmd("QUIT")
    await c.closed()
    # the transaction line names sender, recipient and the outcome
    line = next(rec.message for rec in caplog.records if "outcome=" in rec.message)
    assert "from=<a@example.org> to=<u@example.test>" in line and "outcome=rejected" in line


async def test_a_new_helo_replaces_a_held_helo_rejection(gate_factory: GateFactory, write) -> None:
    write("helo.regexp", "/^bad\\./ REJECT\n")
    gate = await gate_factory('[rules]\nhelo = ["regexp:helo.regexp"]\n')
    c, _ = await gate.client()
    await c.cmd("EHLO bad.example")
    await c.cmd("EHLO good.example")
    await c.cmd("MAIL FROM:<a@example.org>")
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250


async def test_without_delay_reject_helo_is_refused_at_once(
    gate_factory: GateFactory, write
) -> None:
    write("helo.regexp", "/^1\\.2\\.3\\.4$/ REJECT Bare IP\n")
    gate = await gate_factory(
        '[rules]\nhelo = ["regexp:helo.regexp"]\n[smtp]\ndelay_reject = false\n'
    )
    c, _ = await gate.client()
    r = await c.cmd("EHLO 1.2.3.4")
    assert r.code == 554 and "Bare IP (helo.regexp:1)" in r.text
    # a refused HELO is no greeting
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 503
    assert (await c.cmd("EHLO [1.2.3.4]")).code == 250


async def test_client_and_sender_rejections_are_delayed(gate_factory: GateFactory, write) -> None:
    write("client.cidr", "127.0.0.0/24 DEFER Slow down\n")
    gate = await gate_factory('[rules]\nclient = ["cidr:client.cidr"]\n')
    c, _ = await gate.client(source="127.0.0.9")
    assert (await c.cmd("EHLO c.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert (r.code, r.text) == (
        450,
        "4.7.1 <unknown[127.0.0.9]>: Client host rejected: Slow down (client.cidr:1)",
    )


async def test_sender_rejection_at_rcpt_then_next_transaction(
    gate_factory: GateFactory, sink: Sink, write
) -> None:
    write("sender", "<> REJECT No bounces here\n")
    gate = await gate_factory('[rules]\nsender = ["hash:sender"]\n')
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    assert (await c.cmd("MAIL FROM:<>")).code == 250
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert r.code == 554 and "<>: Sender address rejected: No bounces here (sender:1)" in r.text
    await c.cmd("RSET")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250


# ---- scores and thresholds -------------------------------------------------------------


async def test_score_reject_at_rcpt(gate_factory: GateFactory, sink: Sink, write) -> None:
    write("helo.regexp", "/^localhost$/ SCORE 3 HELO_LOCALHOST\n")
    write("sender", "example.org SCORE 3 SENDER_BAD\n")
    gate = await gate_factory(
        '[rules]\nhelo = ["regexp:helo.regexp"]\nsender = ["hash:sender"]\n'
        "[scoring]\nreject = 10\nsymbols = { SENDER_BAD = 7.5 }\n"
    )
    c, _ = await gate.client()
    await c.cmd("EHLO localhost")
    await c.cmd("MAIL FROM:<a@example.org>")
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert (r.code, r.text) == (550, "5.7.1 Message refused as spam (score 10.5)")


async def test_score_tempfail_and_tag(gate_factory: GateFactory, sink: Sink, write) -> None:
    write("body.regexp", "/lottery/ SCORE 4 LOTTERY\n/winner/ SCORE 2 WINNER\n")
    gate = await gate_factory(
        '[rules]\nbody = ["regexp:body.regexp"]\n[scoring]\ntag = 3\ntempfail = 6\n'
    )
    _, replies = await transaction(gate, body=b"Subject: x\r\n\r\nlottery\r\nlottery again\r\n")
    assert replies[-1].code == 250
    head = sink.messages[0].content.split(b"\r\n\r\n")[0]
    assert b"X-Spam-Flag: YES\r\nX-Spam-Score: 4.0\r\nX-Spam-Symbols: LOTTERY" in head
    # per line the first matching rule wins: two lines, two symbols
    _, replies = await transaction(gate, body=b"Subject: x\r\n\r\nlottery winner\r\nwinner\r\n")
    assert (replies[-1].code, replies[-1].enhanced) == (451, "4.7.1")
    assert "score 6.0" in replies[-1].text
    assert len(sink.messages) == 1


# ---- monitor mode -------------------------------------------------------------------


async def test_monitor_mode_refuses_nothing_but_counts(
    gate_factory: GateFactory, sink: Sink, write, caplog
) -> None:
    caplog.set_level(logging.INFO)
    write("recipient", "u@example.test REJECT\n")
    write("sender", "a@example.org SCORE 20 BIG\n")
    gate = await gate_factory(
        '[rules]\nrecipient = ["hash:recipient"]\nsender = ["hash:sender"]\n',
        server={"mode": '"monitor"'},
    )
    would = metric(
        "spamgate_monitor_verdicts_total", stage="rcpt", check="recipient", action="reject"
    )
    would_score = metric(
        "spamgate_monitor_verdicts_total", stage="rcpt", check="score", action="reject"
    )
    _, replies = await transaction(gate)
    assert [r.code for r in replies] == [250, 250, 250, 354, 250]
    assert len(sink.messages) == 1
    assert b"X-Spam-Flag" not in sink.messages[0].content  # tagging is an action too
    assert (
        metric("spamgate_monitor_verdicts_total", stage="rcpt", check="recipient", action="reject")
        == would + 1
    )
    assert (
        metric("spamgate_monitor_verdicts_total", stage="rcpt", check="score", action="reject")
        == would_score + 1
    )
    assert "monitor: recipient would reject at rcpt" in caplog.text
    assert "(rule recipient:1)" in caplog.text


async def test_warn_prefix_monitors_one_rule_and_the_lookup_goes_on(
    gate_factory: GateFactory, sink: Sink, write, caplog
) -> None:
    caplog.set_level(logging.INFO)
    write(
        "helo.regexp",
        "/^new\\./ WARN REJECT trying this out\n/^new\\.bad\\./ REJECT proven rule\n",
    )
    gate = await gate_factory('[rules]\nhelo = ["regexp:helo.regexp"]\n')
    before = metric(
        "spamgate_monitor_verdicts_total", stage="helo", check="helo.regexp", action="reject"
    )
    _, replies = await transaction(gate, helo="new.example.test")
    assert replies[-1].code == 250  # only monitored
    assert (
        metric(
            "spamgate_monitor_verdicts_total", stage="helo", check="helo.regexp", action="reject"
        )
        == before + 1
    )
    assert "would reject at helo" in caplog.text and "(rule helo.regexp:1)" in caplog.text
    # the WARN rule sits above a real one: adding it changed nothing for this client
    _, replies = await transaction(gate, helo="new.bad.example.test")
    assert replies[2].code == 554 and "proven rule (helo.regexp:2)" in replies[2].text


# ---- header and body rules ------------------------------------------------------------


def mime(part_headers: bytes, payload: bytes) -> bytes:
    return (
        b"Subject: hi\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        b"--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nnothing here\r\n"
        b"--b1\r\n" + part_headers + b"\r\n" + payload + b"\r\n--b1--\r\n"
    )


async def test_header_rule_rejects_at_end_of_data(
    gate_factory: GateFactory, sink: Sink, write
) -> None:
    write("header.regexp", "# subjects\n/^Subject:.*\\bcheap meds\\b/ REJECT\n")
    gate = await gate_factory('[rules]\nheader = ["regexp:header.regexp"]\n')
    folded = b"Subject: a very\r\n long subject about cheap meds\r\n\r\nbody\r\n"
    _, replies = await transaction(gate, body=folded)
    r = replies[-1]
    assert (r.code, r.text) == (550, "5.7.1 Message content rejected (header.regexp:2)")
    assert sink.messages == []  # refused content never reaches the upstream


async def test_mime_part_headers_are_matched(gate_factory: GateFactory, sink: Sink, write) -> None:
    write(
        "header.regexp",
        '/^Content-Disposition:.*filename="?[^"]*\\.(exe|scr)"?$/ REJECT No .$1 files\n',
    )
    gate = await gate_factory('[rules]\nheader = ["regexp:header.regexp"]\n')
    body = mime(
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment;\r\n filename="invoice.exe"\r\n',
        base64.encodebytes(b"MZ...").replace(b"\n", b"\r\n"),
    )
    _, replies = await transaction(gate, body=body)
    assert replies[-1].code == 550 and "No .exe files (header.regexp:1)" in replies[-1].text


@pytest.mark.parametrize("encoding", ["base64", "quoted-printable"])
async def test_body_rule_matches_decoded_text(
    gate_factory: GateFactory, sink: Sink, write, encoding: str
) -> None:
    write("body.regexp", "/^Dear winner, claim your prize$/ DISCARD\n")
    gate = await gate_factory('[rules]\nbody = ["regexp:body.regexp"]\n')
    text = b"Hello,\r\nDear winner, claim your prize\r\nBye\r\n"
    if encoding == "base64":
        payload = base64.encodebytes(text).replace(b"\n", b"\r\n")
    else:  # a soft line break inside a word, and an encoded letter
        payload = b"Hello,\r\nDear w=\r\ninner, claim your =70rize\r\nBye\r\n"
    assert b"winner" not in payload  # the words exist only once decoded
    part = f"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: {encoding}\r\n"
    body = mime(part.encode(), payload)
    _, replies = await transaction(gate, body=body)
    assert replies[-1].code == 250
    assert sink.messages == []  # discarded


async def test_body_rules_skip_non_text_parts(gate_factory: GateFactory, sink: Sink, write) -> None:
    write("body.regexp", "/secret word/ REJECT\n")
    gate = await gate_factory('[rules]\nbody = ["regexp:body.regexp"]\n')
    payload = base64.encodebytes(b"secret word").replace(b"\n", b"\r\n")
    body = mime(b"Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n", payload)
    _, replies = await transaction(gate, body=body)
    assert replies[-1].code == 250 and len(sink.messages) == 1


async def test_large_messages_are_scanned_off_the_event_loop_and_bounded(
    gate_factory: GateFactory, sink: Sink, write
) -> None:
    write("body.regexp", "/^needle$/ REJECT\n")
    gate = await gate_factory('[rules]\nbody = ["regexp:body.regexp"]\nbody_part_size = 2000\n')
    filler = b"x" * 70 + b"\r\n"
    early = b"Subject: big\r\n\r\n" + filler * 10 + b"needle\r\n" + filler * 2000
    _, replies = await transaction(gate, body=early)
    assert replies[-1].code == 550
    late = b"Subject: big\r\n\r\n" + filler * 2000 + b"needle\r\n"
    _, replies = await transaction(gate, body=late)
    assert replies[-1].code == 250  # beyond body_part_size: not read


# ---- check errors ------------------------------------------------------------------


@pytest.mark.parametrize(("on_error", "code"), [("continue", 250), ("tempfail", 451)])
async def test_runaway_regexp_applies_on_error(
    gate_factory: GateFactory, sink: Sink, write, caplog, on_error: str, code: int
) -> None:
    caplog.set_level(logging.INFO)
    write("body.regexp", "/^(a|aa)+$/ REJECT\n")
    gate = await gate_factory(
        f'[rules]\nbody = ["regexp:body.regexp"]\non_error = "{on_error}"\nregexp_timeout = 0.05\n'
    )
    before = metric("spamgate_check_errors_total", check="body.regexp", kind="timeout")
    _, replies = await transaction(gate, body=b"Subject: x\r\n\r\n" + b"a" * 900 + b"!\r\n")
    assert replies[-1].code == code
    assert metric("spamgate_check_errors_total", check="body.regexp", kind="timeout") == before + 1
    assert "body.regexp:1: regexp ran longer than" in caplog.text
    assert "Traceback" not in caplog.text


async def test_content_rules_have_every_action(
    gate_factory: GateFactory, sink: Sink, write, caplog
) -> None:
    caplog.set_level(logging.INFO)
    write(
        "body.regexp",
        "/^unsubscribe (here)$/ PREPEND X-List-Hint: $1\n"
        "/^act now$/ WARN REJECT trying a new rule\n"
        "/^act/ SCORE 2 ACT_NOW\n"
        "/^hold me$/ HOLD\n",
    )
    gate = await gate_factory('[rules]\nbody = ["regexp:body.regexp"]\n')
    before = metric(
        "spamgate_monitor_verdicts_total", stage="eod", check="body.regexp", action="reject"
    )
    _, replies = await transaction(
        gate, body=b"Subject: x\r\n\r\nact now\r\nunsubscribe here\r\nunsubscribe here\r\n"
    )
    assert replies[-1].code == 250
    head = sink.messages[0].content.split(b"\r\n\r\n")[0]
    assert head.count(b"X-List-Hint: here\r\n") == 1  # one header, however many lines
    assert (
        metric("spamgate_monitor_verdicts_total", stage="eod", check="body.regexp", action="reject")
        == before + 1
    )
    assert "monitor: body.regexp would reject at eod" in caplog.text
    assert "score=2.0" in caplog.text  # the WARN rule let the lookup go on to ACT_NOW
    _, replies = await transaction(gate, body=b"Subject: x\r\n\r\nhold me\r\n")
    assert replies[-1].code == 250 and len(sink.messages) == 1  # quarantined
