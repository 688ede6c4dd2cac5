"""AUTH passthrough: the upstream owns the passwords; spamgate relays and never logs them."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from pathlib import Path
from typing import ClassVar

import pytest
from aiosmtpd.smtp import SMTP

from spamgate.model import Stage
from spamgate.pipeline.check import Check, CheckContext
from spamgate.pipeline.verdict import Action, Verdict
from spamgate.reply import Reply
from tests.kit.sink import Sink

from ..conftest import GateFactory

BODY = b"Subject: auth\r\n\r\nfrom a user\r\n"
USER, PASSWORD = "alice@example.test", "correct horse battery staple"
PLAIN = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
B64_USER = base64.b64encode(USER.encode()).decode()
B64_PASSWORD = base64.b64encode(PASSWORD.encode()).decode()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def auth_gate(gate_factory: GateFactory, sink: Sink, tls_files):
    sink.behaviour.accounts = {USER: PASSWORD}

    async def start(extra: str = "", **kwargs):
        server = {"auth_passthrough": "true", **kwargs.pop("server", {})}
        return await gate_factory(tls_files.toml + extra, server=server, **kwargs)

    return start


async def tls_client(gate, tls_files, source: str = "127.0.0.5"):
    """A client outside mynetworks (127.0.0.1/32), after STARTTLS and EHLO."""
    c, _ = await gate.client(source=source)
    await c.cmd("EHLO c.example.test")
    await c.starttls(tls_files.client_context())
    ehlo = await c.cmd("EHLO c.example.test")
    return c, ehlo


async def relay_attempt(c) -> int:
    await c.cmd("MAIL FROM:<alice@example.test>")
    r = await c.cmd("RCPT TO:<friend@elsewhere.test>")
    await c.cmd("RSET")
    return r.code


async def test_auth_only_after_starttls(auth_gate, tls_files) -> None:
    gate = await auth_gate()
    c, _ = await gate.client()
    r = await c.cmd("EHLO c.example.test")
    assert not any(line.startswith("AUTH") for line in r.lines)
    r = await c.cmd(f"AUTH PLAIN {PLAIN}")
    assert (r.code, r.enhanced) == (530, "5.7.0")
    c, ehlo = await tls_client(gate, tls_files)
    assert "AUTH PLAIN LOGIN" in ehlo.lines


async def test_auth_plain_lets_the_client_relay(auth_gate, sink: Sink, tls_files) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    assert await relay_attempt(c) == 554  # a stranger may not relay
    r = await c.cmd(f"AUTH PLAIN {PLAIN}")
    assert (r.code, r.text) == (235, "2.7.0 Authentication successful")  # the upstream's words
    replies = await c.mail("alice@example.test", ["friend@elsewhere.test"], BODY)
    assert [r.code for r in replies[1:]] == [250, 250, 354, 250]
    m = sink.messages[0]
    assert m.login == USER and m.rcpt_tos == ["friend@elsewhere.test"]
    # the upstream heard the real client first, then its AUTH
    xi = next(i for i, cmd in enumerate(sink.commands) if cmd.startswith("XCLIENT"))
    assert sink.commands[xi + 1] == "EHLO c.example.test"
    assert "AUTH PLAIN" in sink.commands[xi + 2 :]
    assert "ADDR=127.0.0.5" in sink.commands[xi].split()
    # RFC 4954: once is enough
    assert (await c.cmd(f"AUTH PLAIN {PLAIN}")).code == 503


async def test_auth_login_with_challenges(auth_gate, sink: Sink, tls_files) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    r = await c.cmd("AUTH LOGIN")
    # the challenges are the upstream's own (aiosmtpd's wording here, Postfix's in life)
    assert (r.code, r.lines) == (334, [b64(SMTP.AuthLoginUsernameChallenge)])
    r = await c.cmd(B64_USER)
    assert (r.code, r.lines) == (334, [b64(SMTP.AuthLoginPasswordChallenge)])
    assert (await c.cmd(B64_PASSWORD)).code == 235
    assert await relay_attempt(c) == 250


async def test_auth_plain_with_empty_challenge(auth_gate, tls_files) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    await c.send(b"AUTH PLAIN\r\n")
    assert await c.reader.readline() == b"334 \r\n"  # RFC 4954: the space is mandatory
    assert (await c.cmd(PLAIN)).code == 235


async def test_wrong_password(auth_gate, tls_files) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    bad = base64.b64encode(f"\0{USER}\0guess".encode()).decode()
    r = await c.cmd(f"AUTH PLAIN {bad}")
    assert (r.code, r.enhanced) == (535, "5.7.8")
    assert await relay_attempt(c) == 554
    # a second try on the same session is allowed, and may succeed
    assert (await c.cmd(f"AUTH PLAIN {PLAIN}")).code == 235
    assert await relay_attempt(c) == 250


async def test_client_cancels(auth_gate, sink: Sink, tls_files) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    assert (await c.cmd("AUTH LOGIN")).code == 334
    r = await c.cmd("*")
    assert r.code == 501
    assert await relay_attempt(c) == 554


async def test_answer_that_is_not_base64_ends_the_exchange(
    auth_gate, sink: Sink, tls_files
) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    assert (await c.cmd("AUTH LOGIN")).code == 334
    r = await c.cmd("MAIL FROM:<evil@example.org>")
    assert (r.code, r.enhanced) == (501, "5.7.0")
    assert not any(cmd.startswith("MAIL") for cmd in sink.commands)
    assert (await c.cmd("NOOP")).code == 250  # the session goes on


@pytest.mark.parametrize("stressed", [False, True])
async def test_an_endless_answer_is_under_the_idle_timeout(
    auth_gate, sink: Sink, tls_files, stressed: bool
) -> None:
    """An answer longer than the read buffer, then silence: cut at the idle timeout,
    or at the stress timeout once the server comes under stress."""
    if stressed:
        gate = await auth_gate(
            "[limits]\nidle_timeout = 30\nstress_idle_timeout = 0.3\n"
            "max_sessions = 4\nstress_threshold = 0.5\n"
        )
    else:
        gate = await auth_gate("[limits]\nidle_timeout = 0.5\n")
    c, _ = await tls_client(gate, tls_files)
    assert (await c.cmd("AUTH LOGIN")).code == 334
    await c.send(b"A" * 70_000)  # ... and then silence
    await asyncio.sleep(0.6)
    started = time.monotonic()
    if stressed:
        await gate.client(source="127.0.0.6")  # the second session: stress
    r = await c.reply(timeout=5)
    assert (r.code, r.enhanced) == (421, "4.4.2")
    assert time.monotonic() - started < 1
    assert await c.closed()


async def test_unknown_mechanism_and_sequence_errors(auth_gate, tls_files) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    r = await c.cmd(f"AUTH PLA\u0131N {PLAIN}")  # dotless i: Python upper-cases it to I
    assert (r.code, r.enhanced) == (501, "5.5.4")
    r = await c.cmd("AUTH CRAM-MD5")
    assert (r.code, r.enhanced) == (504, "5.5.4")
    assert (await c.cmd("AUTH")).code == 501
    r = await c.cmd("AUTH PLAIN dünn")  # not base64 (and not ASCII)
    assert (r.code, r.enhanced) == (501, "5.5.2")
    await c.cmd("MAIL FROM:<a@example.org>")
    assert (await c.cmd(f"AUTH PLAIN {PLAIN}")).code == 503  # inside a transaction


async def test_reintroduced_upstream_session_keeps_the_login(
    auth_gate, sink: Sink, tls_files
) -> None:
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    assert (await c.cmd(f"AUTH PLAIN {PLAIN}")).code == 235
    # a new EHLO name means a new upstream session (XCLIENT HELO=...): XCLIENT
    # LOGIN tells the upstream the client is still authenticated
    await c.cmd("EHLO renamed.example.test")
    replies = await c.mail(
        "alice@example.test", ["friend@elsewhere.test"], BODY, helo="renamed.example.test"
    )
    assert replies[-1].code == 250
    assert sink.connections == 2
    xclients = [cmd for cmd in sink.commands if cmd.startswith("XCLIENT")]
    assert f"LOGIN={USER}" in xclients[-1].split()
    assert sink.messages[0].login == USER


async def test_upstream_without_auth(auth_gate, sink: Sink, tls_files, caplog) -> None:
    sink.behaviour.offer_auth = False
    gate = await auth_gate()
    c, _ = await tls_client(gate, tls_files)
    with caplog.at_level(logging.WARNING, logger="spamgate"):
        r = await c.cmd(f"AUTH PLAIN {PLAIN}")
    assert (r.code, r.enhanced) == (454, "4.7.0")
    assert "upstream does not offer PLAIN" in caplog.text
    assert "smtpd_sasl_auth_enable" in caplog.text


async def test_upstream_down_during_auth(auth_gate, sink: Sink, tls_files) -> None:
    gate = await auth_gate()
    await sink.stop()
    c, _ = await tls_client(gate, tls_files)
    r = await c.cmd(f"AUTH PLAIN {PLAIN}")
    assert (r.code, r.enhanced) == (454, "4.7.0")


async def test_listener_without_passthrough(gate_factory: GateFactory, tls_files) -> None:
    gate = await gate_factory(
        tls_files.toml + '[[listener]]\naddress = "127.0.0.1:0"\nauth_passthrough = true\n',
        server={"listen": '["127.0.0.1:0"]'},
    )
    c, _ = await gate.client(listener=0)
    await c.cmd("EHLO c.example.test")
    await c.starttls(tls_files.client_context())
    ehlo = await c.cmd("EHLO c.example.test")
    assert not any(line.startswith("AUTH") for line in ehlo.lines)
    assert (await c.cmd(f"AUTH PLAIN {PLAIN}")).code == 502


async def test_credentials_never_logged(auth_gate, sink: Sink, tls_files, caplog) -> None:
    gate = await auth_gate()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("mail.log").setLevel(logging.DEBUG)  # aiosmtpd's chattiest
        c, _ = await tls_client(gate, tls_files)
        bad = base64.b64encode(f"\0{USER}\0{PASSWORD}x".encode()).decode()
        assert (await c.cmd(f"AUTH PLAIN {bad}")).code == 535
        assert (await c.cmd("AUTH LOGIN")).code == 334
        assert (await c.cmd(B64_USER)).code == 334
        assert (await c.cmd(B64_PASSWORD)).code == 235
        await c.cmd("QUIT")
        await c.closed()
    text = caplog.text
    assert "auth: LOGIN succeeded, sasl_username=" + USER in text  # we did log, usefully
    for secret in (PASSWORD, B64_PASSWORD, PLAIN, bad, PLAIN[8:40]):
        assert secret not in text


class RejectStrangers(Check):
    """A test check: refuses every recipient, as an RBL hit would."""

    name = "testreject"
    stages: ClassVar = frozenset({Stage.RCPT})

    @classmethod
    def from_config(cls, config, services):
        return [cls()]

    async def check(self, ctx: CheckContext) -> Verdict:
        return Verdict(Action.REJECT, Reply(550, "5.7.1", ("listed",)), rule="testreject")


async def test_authenticated_clients_skip_chosen_checks(auth_gate, sink: Sink, tls_files) -> None:
    gate = await auth_gate('[auth]\nskip_checks = ["testreject"]\n', checks=[RejectStrangers])
    c, _ = await tls_client(gate, tls_files)
    await c.cmd("MAIL FROM:<alice@example.test>")
    r = await c.cmd("RCPT TO:<u@example.test>")
    assert (r.code, r.text) == (550, "5.7.1 listed")  # the check runs for strangers
    await c.cmd("RSET")
    assert (await c.cmd(f"AUTH PLAIN {PLAIN}")).code == 235
    replies = await c.mail("alice@example.test", ["u@example.test"], BODY)
    assert replies[-1].code == 250


async def test_skip_checks_names_are_checked(auth_gate) -> None:
    from spamgate.config.settings import ConfigError

    with pytest.raises(ConfigError) as err:
        await auth_gate('[auth]\nskip_checks = ["testrject"]\n', checks=[RejectStrangers])
    where, _, message = err.value.problems[0].rpartition(": [auth]")
    path, line = where.rsplit(":", 1)
    assert message == ' skip_checks: unknown "testrject"'
    assert Path(path).read_text().splitlines()[int(line) - 1].startswith("skip_checks")
