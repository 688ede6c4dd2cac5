"""The core proxy over real sockets: lock-step relay, XCLIENT, failures, relay control."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory

BODY = b"Subject: test\r\nFrom: a@example.org\r\n\r\nHello\r\n..leading dot\r\n"


async def test_ehlo_offers_our_extensions_only(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    c, banner = await gate.client()
    assert banner.code == 220 and banner.lines[0].startswith("gate.test ")
    r = await c.cmd("ehlo client.example.test")  # commands are case-insensitive
    assert r.code == 250
    keywords = {line.split()[0] for line in r.lines[1:]}
    assert {"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES", "DSN"} <= keywords
    assert not keywords & {"XCLIENT", "XFORWARD", "AUTH", "ETRN", "VRFY", "CHUNKING"}
    assert "SIZE 10240000" in r.lines
    await c.close()


async def test_message_relayed_with_xclient(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u1@example.test", "u2@example.test"], BODY)
    assert [r.code for r in replies] == [250, 250, 250, 250, 354, 250]
    assert replies[-1].text == "2.0.0 Ok: queued as SINK"  # the upstream's own words
    assert await c.cmd("QUIT") and await c.closed()
    assert len(sink.messages) == 1
    m = sink.messages[0]
    assert m.mail_from == "a@example.org"
    assert m.rcpt_tos == ["u1@example.test", "u2@example.test"]
    # dot-unstuffed on the way in, re-stuffed on the way out, unchanged in between
    assert m.original == BODY.replace(b"..leading", b".leading")
    assert len(m.xclient) == 1
    attrs = dict(a.split("=", 1) for a in m.xclient[0].split())
    assert attrs["ADDR"] == "127.0.0.1"
    assert attrs["HELO"] == "client.example.test"
    assert attrs["PROTO"] == "ESMTP"
    assert attrs["NAME"] == "[UNAVAILABLE]"
    assert int(attrs["PORT"]) > 0
    # after XCLIENT the upstream hears the client's own EHLO name
    assert m.helo == "client.example.test"
    xi = next(i for i, cmd in enumerate(sink.commands) if cmd.startswith("XCLIENT"))
    assert sink.commands[xi + 1] == "EHLO client.example.test"


async def test_xclient_off(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(up={"xclient": "false"})
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert replies[-1].code == 250
    assert not any(cmd.startswith("XCLIENT") for cmd in sink.commands)
    assert sink.messages[0].xclient == []


async def test_upstream_without_xclient_is_a_tempfail(
    gate_factory: GateFactory, sink: Sink
) -> None:
    sink.behaviour.offer_xclient = False
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.enhanced) == (451, "4.3.0")
    assert sink.messages == []


async def test_xclient_values_cannot_smuggle_attributes(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    r = await c.cmd("EHLO x ADDR=10.0.0.1")
    assert r.code == 501  # a HELO name is one word
    r = await c.cmd("EHLO x+ADDR=10.0.0.1")
    assert r.code == 250
    replies = [await c.cmd("MAIL FROM:<a@example.org>"), await c.cmd("RCPT TO:<u@example.test>")]
    assert [r.code for r in replies] == [250, 250]
    line = next(cmd for cmd in sink.commands if cmd.startswith("XCLIENT"))
    assert "HELO=x+2BADDR+3D10.0.0.1" in line.split()
    assert [a for a in line.split() if a.startswith("ADDR=")] == ["ADDR=127.0.0.1"]


async def test_upstream_rejections_relayed_verbatim(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    sink.behaviour.refuse_local = "nobody"
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    r = await c.cmd("RCPT TO:<nobody@example.test>")
    assert (r.code, r.text) == (
        550,
        "5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
    )
    assert (await c.cmd("RCPT TO:<ok@example.test>")).code == 250
    sink.behaviour.replies["DOT"] = "554 5.7.1 content refused by upstream"
    assert (await c.cmd("DATA")).code == 354
    await c.send(BODY + b".\r\n")
    r = await c.reply()
    assert (r.code, r.text) == (554, "5.7.1 content refused by upstream")
    assert sink.messages == []


async def test_upstream_mail_tempfail_relayed(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.replies["MAIL"] = "452 4.3.1 Insufficient system storage"
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.text) == (452, "4.3.1 Insufficient system storage")
    # the transaction did not start: RCPT needs a new MAIL
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 503


async def test_upstream_data_command_refused(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.replies["DATA"] = "451 4.3.0 DATA not now"
    gate = await gate_factory()
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert (replies[-1].code, replies[-1].text) == (451, "4.3.0 DATA not now")
    assert sink.messages == []


async def test_upstream_down(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    await sink.stop()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.enhanced) == (451, "4.3.0")
    # the session goes on: a later attempt may succeed
    assert (await c.cmd("NOOP")).code == 250


async def test_upstream_closes_mid_data(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.drop_in_data_after = 10
    gate = await gate_factory()
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY * 20)
    assert (replies[-1].code, replies[-1].enhanced) == (451, "4.3.0")
    assert sink.messages == []
    # the next transaction gets a fresh upstream session
    sink.behaviour.drop_in_data_after = None
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(BODY + b".\r\n")
    assert (await c.reply()).code == 250
    assert len(sink.messages) == 1


async def test_slow_upstream_times_out_without_250(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.delays["DOT"] = 3
    gate = await gate_factory(up={"data_timeout": "0.5"})
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert (replies[-1].code, replies[-1].enhanced) == (451, "4.3.0")


async def test_slow_upstream_rcpt_times_out(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.delays["RCPT"] = 3
    gate = await gate_factory(up={"command_timeout": "0.5"})
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert (r.code, r.enhanced) == (451, "4.3.0")
    assert (await c.cmd("DATA")).code == 554  # no accepted recipient


async def test_upstream_421_closes_client_session(gate_factory: GateFactory, sink: Sink) -> None:
    sink.behaviour.replies["RCPT"] = "421 4.7.0 sink.test Error: too many errors"
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert r.code == 421
    assert await c.closed()


async def test_relay_denied_for_strangers(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client(source="127.0.0.5")  # outside mynetworks (127.0.0.1/32)
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    r = await c.cmd("RCPT TO:<victim@elsewhere.test>")
    assert (r.code, r.text) == (554, "5.7.1 <victim@elsewhere.test>: Relay access denied")
    assert (await c.cmd("RCPT TO:<u@EXAMPLE.test>")).code == 250
    assert (await c.cmd("RCPT TO:<postmaster>")).code == 250
    assert not any("elsewhere.test" in cmd for cmd in sink.commands)


async def test_mynetworks_may_relay(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client(source="127.0.0.1")
    replies = await c.mail("a@example.org", ["x@elsewhere.test"], BODY)
    assert replies[-1].code == 250
    assert sink.messages[0].rcpt_tos == ["x@elsewhere.test"]


async def test_subdomain_relay_domains(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(server={"relay_domains": '["example.test", ".sub.test"]'})
    c, _ = await gate.client(source="127.0.0.6")
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    assert (await c.cmd("RCPT TO:<u@a.sub.test>")).code == 250
    assert (await c.cmd("RCPT TO:<u@sub.test>")).code == 554
    assert (await c.cmd("RCPT TO:<u@x.example.test>")).code == 554


# Sender-specified routing through a domain of ours: refused from
# clients that may not relay, as Postfix's allow_untrusted_routing = no does.
ROUTED = [
    "user%other.test@example.test",
    "other.test!user@example.test",
    '"user@other.test"@example.test',
    '"user%other.test"@example.test',
    '"other.test!user"@example.test',
    '"user\\@other.test"@example.test',
    "@example.test:user%other.test@example.test",
]


async def test_untrusted_clients_may_not_route(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client(source="127.0.0.5")  # outside mynetworks (127.0.0.1/32)
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    for rcpt in ROUTED:
        r = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert (r.code, r.enhanced) == (554, "5.7.1"), (rcpt, r)
        assert "Relay access denied" in r.text
    # A source route is not routing: it is dropped (RFC 5321 §3.6.1, Appendix C),
    # as Postfix drops it, and never reaches the upstream.
    assert (await c.cmd("RCPT TO:<@other.test:user@example.test>")).code == 250
    assert (await c.cmd("RCPT TO:<@example.test:user@other.test>")).code == 554
    rcpts = [cmd for cmd in sink.commands if cmd.startswith("RCPT")]
    assert rcpts == ["RCPT TO:<user@example.test>"]


async def test_trusted_clients_may_route(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client(source="127.0.0.1")  # mynetworks
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    assert (await c.cmd("RCPT TO:<user%other.test@example.test>")).code == 250


async def test_relay_domains_compare_as_ascii_and_idna(
    gate_factory: GateFactory, sink: Sink
) -> None:
    """Never Unicode case folding: the Kelvin sign K lower-cases to "k" in Python,
    but it is another domain to the upstream; IDN domains as A-labels."""
    domains = '["bank.test", ".sub.bank.test", "b\u00e4nk.test", "xn--bcher-kva.test"]'
    gate = await gate_factory(server={"relay_domains": domains})
    c, _ = await gate.client(source="127.0.0.5")
    await c.cmd("EHLO c.test")
    assert (await c.cmd("MAIL FROM:<a@example.org> SMTPUTF8")).code == 250
    for rcpt in (
        "u@ban\u212a.test",  # Kelvin sign
        "u@x.sub.ban\u212a.test",
        "u@\uff42ank.test",  # full-width b
        "u@B\u00c4NK.test",  # not a U-label (IDNA2008: no upper case)
        "u@bank.te\u017ft",  # long s
    ):
        r = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert (r.code, r.enhanced) == (554, "5.7.1"), (rcpt, r)
    for rcpt in (
        "u@BANK.test",
        "u@bank.test.",
        "u@x.SUB.bank.test",
        "u@b\u00e4nk.test",
        "u@xn--bnk-qla.test",
        "u@b\u00fccher.test",
    ):
        assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 250, rcpt
    assert not any("\u212a" in cmd or "\u017f" in cmd for cmd in sink.commands)


async def test_several_transactions_and_rset(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    for i in range(3):
        assert (await c.cmd(f"MAIL FROM:<s{i}@example.org>")).code == 250
        assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
        if i == 1:
            assert (await c.cmd("RSET")).code == 250
            continue
        assert (await c.cmd("DATA")).code == 354
        await c.send(b"Subject: %d\r\n\r\nbody\r\n.\r\n" % i)
        assert (await c.reply()).code == 250
    assert [m.mail_from for m in sink.messages] == ["s0@example.org", "s2@example.org"]
    assert "RSET" in sink.commands
    assert sink.connections == 1  # one upstream session for the whole client session


async def test_null_sender(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    assert (await c.cmd("MAIL FROM:<>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(b"Subject: bounce\r\n\r\nx\r\n.\r\n")
    assert (await c.reply()).code == 250
    assert sink.messages[0].mail_from == ""
    assert "MAIL FROM:<>" in sink.commands


async def test_smtputf8_addresses(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    r = await c.cmd("MAIL FROM:<jöran@exämple.org>")
    assert (r.code, r.enhanced) == (553, "5.6.7")
    assert (await c.cmd("MAIL FROM:<jöran@exämple.org> SMTPUTF8")).code == 250
    assert (await c.cmd("RCPT TO:<dörte@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send("Subject: grüße\r\n\r\nhej\r\n.\r\n".encode())
    assert (await c.reply()).code == 250
    m = sink.messages[0]
    assert m.mail_from == "jöran@exämple.org" and m.rcpt_tos == ["dörte@example.test"]
    assert m.mail_params == ["SMTPUTF8"]


async def test_dsn_and_other_parameters_passed_verbatim(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    r = await c.cmd("MAIL FROM:<a@example.org> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1")
    assert r.code == 250
    r = await c.cmd("RCPT TO:<u@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@example.test")
    assert r.code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(BODY + b".\r\n")
    assert (await c.reply()).code == 250
    m = sink.messages[0]
    assert m.mail_params == ["SIZE=1000", "BODY=8BITMIME", "RET=HDRS", "ENVID=QQ+2B1"]
    assert m.rcpt_params == [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;u@example.test"]]
    r = await c.cmd("MAIL FROM:<a@example.org> MT-PRIORITY=3")
    assert (r.code, r.enhanced) == (555, "5.5.4")


# Parameters whose Unicode case mapping or digits look like valid ones:
# each is a syntax error, never relayed, never a traceback.
TRAPS = [
    ("MAIL FROM:<a@example.org> SIZE=\u0661\u0662", "5.5.4"),  # Arabic-Indic digits
    ("MAIL FROM:<a@example.org> SIZE=\uff11\uff12", "5.5.4"),  # full-width digits
    ("MAIL FROM:<a@example.org> SIZE=\u00b2", "5.5.4"),  # superscript two: isdigit()
    ("MAIL FROM:<a@example.org> BODY=8b\u0131tmime", "5.5.4"),  # dotless i upper-cases to I
    ("MAIL FROM:<a@example.org> RET=HDR\u017f", "5.5.4"),  # long s upper-cases to S
    ("MAIL FROM:<a@example.org> SMTPUTF8 SIZE=\u0661\u0662", "5.5.4"),
    ("MAIL FROM:<a@example.org> SMTPUTF8 BODY=8b\u0131tmime", "5.5.4"),
    ("MAIL FROM:<a@example.org> ENVID=\u00fc", "5.5.4"),
]
RCPT_TRAPS = [
    "RCPT TO:<u@example.test> NOTIFY=\u017fuccess",
    "RCPT TO:<u@example.test> NOTIFY=FAILURE,\u017fUCCESS",
    "RCPT TO:<u@example.test> ORCPT=rfc822;\u00fc@example.test",
    "RCPT TO:<u@example.test> ORCPT=utf-8;\u00fc@example.test",  # needs SMTPUTF8
    "RCPT TO:<u@example.test> ORCPT=rfc822;a+ZZ",  # not xtext
    "RCPT TO:<u@example.test> ORCPT=rfc\u0131822;a@example.test",
]


async def test_unicode_lookalike_parameters_are_syntax_errors(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    gate = await gate_factory()
    c, _ = await gate.client(source="127.0.0.5")
    assert (await c.cmd("EHLO c.test")).code == 250
    for line, enhanced in TRAPS:
        r = await c.cmd(line)
        assert (r.code in (501, 555), r.enhanced) == (True, enhanced), (line, r)
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    for line in RCPT_TRAPS:
        r = await c.cmd(line)
        assert (r.code in (501, 555), r.enhanced) == (True, "5.5.4"), (line, r)
    assert (await c.cmd("RSET")).code == 250
    # the same with SMTPUTF8: a UTF-8 ORCPT of type utf-8 is fine (RFC 6533)
    assert (await c.cmd("MAIL FROM:<a@example.org> SMTPUTF8")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test> NOTIFY=\u017fuccess")).code == 501
    r = await c.cmd("RCPT TO:<u@example.test> ORCPT=utf-8;\u00fc@example.test")
    assert r.code == 250
    assert not any(cmd.startswith("RCPT") and "\u017f" in cmd for cmd in sink.commands)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


async def test_verbs_are_ascii(gate_factory: GateFactory, sink: Sink) -> None:
    """ "MA\u0130L" is no MAIL, though Python upper-cases "\u0131" to "I"."""
    gate = await gate_factory()
    c, _ = await gate.client()
    assert (await c.cmd("EHLO c.test")).code == 250
    assert (await c.cmd("ma\u0131l FROM:<a@example.org>")).code == 502
    assert (await c.cmd("mail FROM:<a@example.org>")).code == 250
    assert sum(cmd.startswith("MAIL") for cmd in sink.commands) == 1


async def test_pipelined_transaction(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u1@example.test>\r\n"
        b"RCPT TO:<x@elsewhere.test>\r\nRCPT TO:<u2@example.test>\r\nDATA\r\n"
    )
    codes = [(await c.reply()).code for _ in range(5)]
    assert codes == [250, 250, 250, 250, 354]  # 127.0.0.1 is in mynetworks
    await c.send(BODY + b".\r\nQUIT\r\n")
    assert (await c.reply()).code == 250
    assert (await c.reply()).code == 221
    assert sink.messages[0].rcpt_tos == ["u1@example.test", "x@elsewhere.test", "u2@example.test"]


async def test_pipelining_past_ehlo_is_refused(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.send(b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (554, "5.5.0")
    assert await c.closed()
    assert sink.connections == 0


async def test_content_sent_before_354_is_refused(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n" + BODY + b".\r\n"
    )
    codes = [(await c.reply()).code for _ in range(3)]
    assert codes == [250, 250, 554]
    assert await c.closed()
    assert sink.messages == []


async def test_half_close_after_pipelined_quit(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    assert [(await c.reply()).code for _ in range(3)] == [250, 250, 354]
    await c.send(BODY + b".\r\nQUIT\r\n")
    c.writer.write_eof()
    assert (await c.reply()).code == 250
    assert (await c.reply()).code == 221
    assert len(sink.messages) == 1


async def test_sequence_errors(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 503
    await c.cmd("EHLO c.test")
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 503
    assert (await c.cmd("DATA")).code == 503
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 503
    assert (await c.cmd("DATA")).code == 554  # no valid recipients
    assert (await c.cmd("VRFY root")).code == 502
    r = await c.cmd("FOO bar")
    assert (r.code, r.enhanced) == (502, "5.5.2")
    r = await c.cmd("MAIL FROM:a@example.org")
    assert r.code == 503  # still in the transaction
    await c.cmd("RSET")
    r = await c.cmd("MAIL FROM:a@example.org")
    assert (r.code, r.enhanced) == (501, "5.5.4")


async def test_bare_lf_in_commands(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.send(b"EHLO c.test\n")
    r = await c.reply()
    assert (r.code, r.enhanced) == (500, "5.5.2")
    assert "bare <LF>" in r.text


async def test_http_request_is_dropped(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    c, _ = await gate.client()
    r = await c.cmd("GET / HTTP/1.1")
    assert r.code == 521
    assert await c.closed()


async def test_maildir_upstream(gate_factory: GateFactory, tmp_path) -> None:
    maildir = tmp_path / "mail"
    gate = await gate_factory(upstream=None, up={"address": f'"maildir:{maildir}"'})
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert replies[-1].code == 250
    files = list((maildir / "new").iterdir())
    assert len(files) == 1
    data = files[0].read_bytes()
    assert data.startswith(b"Return-Path: <a@example.org>\r\nReceived: from client.example.test")
    assert b"[127.0.0.1]" in data
    assert data.endswith(BODY.replace(b"..leading", b".leading"))
    assert list((maildir / "tmp").iterdir()) == []


async def test_concurrent_sessions(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory()

    async def one(i: int) -> int:
        c, _ = await gate.client()
        replies = await c.mail(f"s{i}@example.org", ["u@example.test"], BODY)
        await c.cmd("QUIT")
        return replies[-1].code

    codes = await asyncio.gather(*(one(i) for i in range(20)))
    assert codes == [250] * 20
    assert sorted(m.mail_from for m in sink.messages) == sorted(
        f"s{i}@example.org" for i in range(20)
    )


async def test_raw_client_helper_sees_close(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    c, _ = await RawClient.connect(gate.port)
    await c.cmd("QUIT")
    assert await c.closed()


async def test_a_bug_in_a_session_is_logged_and_answered(gate_factory, monkeypatch, caplog) -> None:
    # Found when a module could not be imported after the privilege drop: the
    # session ended without a word, in the log or to the client.
    from spamgate.flow.driver import SessionDriver

    async def broken(self):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(SessionDriver, "connect", broken)
    gate = await gate_factory()
    c, banner = await gate.client()
    assert (banner.code, banner.enhanced) == (421, "4.3.0")
    assert await c.closed()
    assert "session failed" in caplog.text and "RuntimeError: simulated bug" in caplog.text


async def test_one_info_line_per_normal_session(
    gate_factory: GateFactory, sink: Sink, caplog: pytest.LogCaptureFixture
) -> None:
    """A session that delivered and said QUIT is its transaction line; sessions
    without a transaction, or ending otherwise, also get their disconnect line."""
    caplog.set_level(logging.INFO, logger="spamgate.session")
    gate = await gate_factory()
    c, _ = await gate.client()
    await c.mail("a@example.org", ["u@example.test"], BODY)
    await c.cmd("QUIT")
    await c.closed()
    await asyncio.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "spamgate.session"]
    assert len(lines) == 1 and "outcome=accepted" in lines[0], lines
    caplog.clear()
    c, _ = await gate.client()  # connects, says EHLO, then goes away
    await c.cmd("EHLO quiet.example.test")
    await c.close()
    await asyncio.sleep(0.1)
    lines = [r.getMessage() for r in caplog.records if r.name == "spamgate.session"]
    assert len(lines) == 1, lines
    assert (
        lines[0]
        .split(", messages=")[0]
        .endswith(("disconnect from unknown[127.0.0.1]: disconnected", "connection lost"))
    ), lines
