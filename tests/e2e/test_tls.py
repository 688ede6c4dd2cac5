"""STARTTLS inbound: the handshake, the RFC 3207 reset, injection, require_tls, reload."""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import ssl

import pytest

from spamgate import metrics
from spamgate.app import build, loads
from spamgate.config.settings import ConfigError
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory, issue

BODY = b"Subject: tls\r\nFrom: a@example.org\r\n\r\nover TLS\r\n"


def counter(metric, *labels: str) -> float:
    return metric.labels(*labels)._value.get()


async def test_starttls_then_mail(gate_factory: GateFactory, sink: Sink, tls_files) -> None:
    gate = await gate_factory(tls_files.toml)
    c, _ = await gate.client()
    r = await c.cmd("EHLO before.example.test")
    assert "STARTTLS" in r.lines
    assert (await c.starttls(tls_files.client_context())).code == 220
    assert c.tls_version in ("TLSv1.2", "TLSv1.3")
    # RFC 3207 §4.2: what the client said before TLS is forgotten
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 503
    r = await c.cmd("EHLO after.example.test")
    assert r.code == 250 and "STARTTLS" not in r.lines
    r = await c.cmd("STARTTLS")
    assert (r.code, r.enhanced) == (554, "5.5.1")  # TLS already active
    replies = [
        await c.cmd("MAIL FROM:<a@example.org>"),
        await c.cmd("RCPT TO:<u@example.test>"),
        await c.cmd("DATA"),
    ]
    assert [r.code for r in replies] == [250, 250, 354]
    await c.send(BODY + b".\r\n")
    assert (await c.reply()).code == 250
    m = sink.messages[0]
    # the upstream heard the name given over TLS, in the XCLIENT and after it
    assert "HELO=after.example.test" in m.xclient[0].split()
    assert m.helo == "after.example.test"
    # TLS facts, which Postfix's XCLIENT cannot carry, are in our Received line
    head, _, rest = m.original.partition(b"\r\n\t(using ")
    assert head == b"Received: from after.example.test (unknown [127.0.0.1])"
    assert rest.startswith(c.tls_version.encode() + b" with cipher ")
    assert b"by gate.test (spamgate) with ESMTPS id " in rest
    assert m.content.endswith(BODY)


async def test_starttls_upstream_session_is_introduced_again(
    gate_factory: GateFactory, sink: Sink, tls_files
) -> None:
    gate = await gate_factory(tls_files.toml)
    c, _ = await gate.client()
    await c.cmd("EHLO plain.example.test")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250  # upstream opened
    assert (await c.cmd("RSET")).code == 250
    await c.starttls(tls_files.client_context())
    await c.mail("a@example.org", ["u@example.test"], BODY, helo="tls.example.test")
    assert sink.connections == 2  # the plaintext session was not reused
    assert "HELO=tls.example.test" in sink.messages[0].xclient[0].split()


async def test_plaintext_injected_after_starttls_is_discarded(
    gate_factory: GateFactory, sink: Sink, tls_files
) -> None:
    gate = await gate_factory(tls_files.toml)
    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    # CVE-2011-0411 / CVE-2024-34083: a man in the middle appends a command to the
    # client's STARTTLS, in the same packet, before encryption starts.
    await c.send(b"STARTTLS\r\nRSET\r\n")
    assert (await c.reply()).code == 220
    await c.writer.start_tls(tls_files.client_context(), server_hostname="gate.test")
    r = await c.cmd("EHLO c.example.test")
    # the first reply inside TLS answers our EHLO, not the injected RSET
    assert r.code == 250 and r.lines[0] == "gate.test"
    assert (await c.cmd("NOOP")).text == "2.0.0 Ok"
    await c.cmd("QUIT")
    assert await c.closed()


async def test_injected_transaction_after_starttls_has_no_effect(
    gate_factory: GateFactory, sink: Sink, tls_files
) -> None:
    gate = await gate_factory(tls_files.toml)
    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    await c.send(
        b"STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@evil.test>\r\nRCPT TO:<u@example.test>\r\n"
    )
    assert (await c.reply()).code == 220
    await c.writer.start_tls(tls_files.client_context(), server_hostname="gate.test")
    # no HELO and no transaction survived: MAIL needs a fresh EHLO
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 503
    assert (await c.cmd("EHLO c.example.test")).code == 250
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert not any("evil" in cmd for cmd in sink.commands)


async def test_require_tls_listener(gate_factory: GateFactory, sink: Sink, tls_files) -> None:
    gate = await gate_factory(
        tls_files.toml + '\n[[listener]]\naddress = "127.0.0.1:0"\nrequire_tls = true\n',
        server={"listen": '["127.0.0.1:0"]'},
    )
    # listener 0 is [server] listen: no TLS required there
    c, _ = await gate.client(listener=0)
    await c.cmd("EHLO c.example.test")
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    # listener 1 requires it
    c, _ = await gate.client(listener=1)
    await c.cmd("EHLO c.example.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.enhanced, r.lines[0]) == (
        530,
        "5.7.0",
        "5.7.0 Must issue a STARTTLS command first",
    )
    await c.starttls(tls_files.client_context())
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert replies[-1].code == 250
    assert len(sink.messages) == 1


async def test_client_requiring_tls_against_listener_without_certificate(
    gate_factory: GateFactory, sink: Sink, tls_files
) -> None:
    gate = await gate_factory()  # no [tls]
    c, _ = await gate.client()
    r = await c.cmd("EHLO c.example.test")
    assert "STARTTLS" not in r.lines
    r = await c.cmd("STARTTLS")
    assert (r.code, r.enhanced) == (502, "5.5.1")
    # a client that insists on TLS (smtplib, as a careful MTA would) gives up
    # before sending anything: no plaintext fallback
    host, port = gate.server.addresses[0]

    def strict_client() -> str:
        with smtplib.SMTP(host, port, timeout=10) as s:
            s.ehlo("strict.example.test")
            try:
                s.starttls(context=tls_files.client_context())
            except smtplib.SMTPNotSupportedError as exc:
                return f"refused: {exc}"
            s.sendmail("a@example.org", ["u@example.test"], BODY)
            return "sent"

    assert (await asyncio.to_thread(strict_client)).startswith("refused: STARTTLS")
    assert sink.messages == []


def test_require_tls_without_certificate_is_a_config_error() -> None:
    text = '[server]\nlisten = ["127.0.0.1:25"]\nrequire_tls = true\n'
    with pytest.raises(ConfigError) as err:
        loads(text, "r.toml")
    assert err.value.problems == [
        "r.toml:1: 127.0.0.1:25: require_tls needs [tls] cert_file and key_file"
    ]


async def test_minimum_tls_version(gate_factory: GateFactory, sink: Sink, tls_files) -> None:
    gate = await gate_factory(tls_files.toml + 'min_version = "TLSv1.3"\n')
    failures = counter(metrics.STARTTLS, "failure")
    old = tls_files.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await c.starttls(old)
    for _ in range(50):
        if counter(metrics.STARTTLS, "failure") > failures:
            break
        await asyncio.sleep(0.02)
    assert counter(metrics.STARTTLS, "failure") == failures + 1
    # the listener lives on, and a modern client gets TLS 1.3
    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    await c.starttls(tls_files.client_context())
    assert c.tls_version == "TLSv1.3"


async def test_garbage_instead_of_handshake(gate_factory: GateFactory, tls_files) -> None:
    gate = await gate_factory(tls_files.toml)
    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    assert (await c.cmd("STARTTLS")).code == 220
    await c.send(b"EHLO not-tls.example.test\r\n" * 10)
    assert await c.closed()
    c, banner = await gate.client()
    assert banner.code == 220


async def test_certificate_is_reloaded(gate_factory: GateFactory, ca, tmp_path, tls_files) -> None:
    gate = await gate_factory(tls_files.toml, server={"reload_interval": "0"})
    first = await served_serial(gate, tls_files)
    renewed = issue(ca, tmp_path, tag="-renewed")
    shutil.copyfile(renewed.cert, tls_files.cert)
    shutil.copyfile(renewed.key, tls_files.key)
    cfg = gate.server.config.path
    assert await gate.server.reload(cfg)
    second = await served_serial(gate, tls_files)
    assert second != first
    # a key that does not match the certificate refuses the reload; TLS goes on
    shutil.copyfile(issue(ca, tmp_path, tag="-other").key, tls_files.key)
    assert not await gate.server.reload(cfg)
    assert await served_serial(gate, tls_files) == second


async def test_renewed_certificate_is_picked_up_without_sighup(
    gate_factory: GateFactory, ca, tmp_path, tls_files
) -> None:
    gate = await gate_factory(tls_files.toml, server={"reload_interval": "0.05"})
    first = await served_serial(gate, tls_files)
    # what a renewal hook does: new files in place, no signal
    renewed = issue(ca, tmp_path, tag="-renewed")
    shutil.copyfile(renewed.cert, tls_files.cert)
    shutil.copyfile(renewed.key, tls_files.key)
    for _ in range(100):
        await asyncio.sleep(0.05)
        if await served_serial(gate, tls_files) != first:
            break
    assert await served_serial(gate, tls_files) != first


async def served_serial(gate, tls_files) -> int:
    from cryptography import x509

    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    await c.starttls(tls_files.client_context())
    der = c.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    await c.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_tls_files_checked_at_load(tmp_path) -> None:
    from spamgate.ops.server import Server

    path = tmp_path / "t.toml"
    text = '[server]\nlisten = ["127.0.0.1:0"]\n\n[tls]\ncert_file = "nope.crt"\n'
    text += 'key_file = "nope.key"\n'
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        Server(build(loads(text, str(path))))
    assert err.value.problems == [
        f"{path}:5: [tls] cert_file {tmp_path}/nope.crt: no such file",
        f"{path}:6: [tls] key_file {tmp_path}/nope.key: no such file",
    ]


async def test_starttls_only_when_configured_listener_shows_it(
    gate_factory: GateFactory, tls_files
) -> None:
    gate = await gate_factory(tls_files.toml)
    c, _ = await RawClient.connect(gate.port)
    r = await c.cmd("EHLO c.example.test")
    assert r.lines.count("STARTTLS") == 1
    assert not any(line.startswith("AUTH") for line in r.lines)  # passthrough is off


# -- STARTTLS towards the upstream ----------------------------------------------------


def sink_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "sink.test").configure_cert(ctx)
    return ctx


async def test_upstream_tls_required_and_verified(
    gate_factory: GateFactory, sink: Sink, ca, tmp_path
) -> None:
    sink.behaviour.tls_context = sink_tls(ca)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    gate = await gate_factory(up={"tls": '"required"', "tls_ca_file": f'"{tmp_path}/ca.pem"'})
    c, _ = await gate.client()
    replies = await c.mail("a@example.org", ["u@example.test"], BODY)
    assert replies[-1].code == 250
    assert sink.messages[0].tls
    assert sink.commands[:3] == ["EHLO gate.test", "STARTTLS", "EHLO gate.test"]
    assert sink.commands[3].startswith("XCLIENT ")  # the client is introduced inside TLS


async def test_upstream_tls_required_but_not_offered(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(up={"tls": '"required"'})
    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.enhanced) == (451, "4.3.0")
    assert not any(cmd.startswith(("XCLIENT", "MAIL")) for cmd in sink.commands)


async def test_upstream_tls_required_with_untrusted_certificate(
    gate_factory: GateFactory, sink: Sink
) -> None:
    import trustme

    sink.behaviour.tls_context = sink_tls(trustme.CA())  # nobody trusts this CA
    gate = await gate_factory(up={"tls": '"required"'})
    c, _ = await gate.client()
    await c.cmd("EHLO c.example.test")
    r = await c.cmd("MAIL FROM:<a@example.org>")
    assert (r.code, r.enhanced) == (451, "4.3.0")
    assert not any(cmd.startswith(("XCLIENT", "MAIL")) for cmd in sink.commands)


async def test_upstream_tls_opportunistic(gate_factory: GateFactory, sink: Sink) -> None:
    import trustme

    gate = await gate_factory(up={"tls": '"opportunistic"'})
    # not offered: plaintext
    c, _ = await gate.client()
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    # offered, with a certificate nobody can verify: encrypted all the same
    sink.behaviour.tls_context = sink_tls(trustme.CA())
    c, _ = await gate.client()
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    assert [m.tls for m in sink.messages] == [False, True]


async def test_upstream_tls_opportunistic_falls_back_when_refused(
    gate_factory: GateFactory, sink: Sink, ca
) -> None:
    sink.behaviour.tls_context = sink_tls(ca)
    sink.behaviour.replies["STARTTLS"] = "454 4.7.0 TLS not available due to local problem"
    gate = await gate_factory(up={"tls": '"opportunistic"'})
    c, _ = await gate.client()
    assert (await c.mail("a@example.org", ["u@example.test"], BODY))[-1].code == 250
    assert sink.connections == 2  # a fresh plaintext session, as Postfix's "may" does
    assert sink.messages[0].tls is False
