"""Log lines a client cannot forge: control characters a client put in
a value (the AUTH PLAIN authorization identity, a quoted local part with a line
separator) are escaped where records become text, in a real `spamgate run`
process writing to stderr, plain and for the journal.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import signal

import pytest

from spamgate.logescape import EscapeFilter, escape
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import TlsFiles
from .test_daemon import free_port, start

USER, PASSWORD = "alice@example.test", "correct horse"
FORGED = "spamgate.session: sid=FORGED auth: PLAIN succeeded, sasl_username=admin"
PLAIN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [a-z.]+: ")
JOURNAL_LINE = re.compile(r"^<\d>[a-z.]+: ")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\x0ab"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("nul\x00", "nul\\x00"),
        ("esc\x1b[31m", "esc\\x1b[31m"),
        ("tab\t", "tab\\x09"),
        ("nel\x85", "nel\\x85"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("rlo\u202eevil", "rlo\\u202eevil"),
        ("surrogate\udcff", "surrogate\\udcff"),
        ("grüße, 漢字, émoji 🙂", "grüße, 漢字, émoji 🙂"),
    ],
)
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown
    assert escape(shown) == shown  # nothing left to escape: applying it twice is harmless


def test_the_filter_escapes_messages_and_exception_text() -> None:
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "user %s", ("x\ny",), None)
    try:
        raise ValueError(f"bad\n{FORGED}")
    except ValueError as exc:
        record.exc_info = (ValueError, exc, exc.__traceback__)
    assert EscapeFilter().filter(record)
    text = logging.Formatter("%(message)s").format(record)
    assert text.startswith("user x\\x0ay\nTraceback (most recent call last):")
    assert f"ValueError: bad\\x0a{FORGED}" in text
    assert not any(line.startswith("spamgate.session") for line in text.splitlines())


def plain(authzid: str) -> str:
    return base64.b64encode(f"{authzid}\0{USER}\0{PASSWORD}".encode()).decode()


@pytest.mark.parametrize("journal", [False, True])
async def test_a_client_cannot_forge_a_log_line(
    sink: Sink, tls_files: TlsFiles, tmp_path, journal: bool
) -> None:
    sink.behaviour.accounts = {USER: PASSWORD}
    port = free_port()
    config = tmp_path / "spamgate.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "gate.test"\n'
        'relay_domains = ["example.test"]\nmynetworks = ["127.0.0.1/32"]\n'
        f"auth_passthrough = true\n{tls_files.toml}"
        f'[upstream]\naddress = "{sink.address}"\n[dns]\nreverse_lookup = false\n'
    )
    stderr_path = tmp_path / "stderr"
    stderr_path.touch()
    env = {}
    if journal:
        st = stderr_path.stat()
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    proc = await start(config, env, stderr_path)
    try:
        for _ in range(200):
            if "listening on" in stderr_path.read_text():
                break
            await asyncio.sleep(0.05)
        c, _ = await RawClient.connect(port, source="127.0.0.5")
        await c.cmd("EHLO c.example.test")
        await c.starttls(tls_files.client_context())
        await c.cmd("EHLO c.example.test")
        # the authorization identity is logged as sasl_username
        assert (await c.cmd(f"AUTH PLAIN {plain('x' + chr(10) + FORGED)}")).code == 235
        await c.cmd("QUIT")
        c, _ = await RawClient.connect(port, source="127.0.0.5")
        await c.cmd("EHLO c.example.test")
        assert (await c.cmd("MAIL FROM:<a@example.org> SMTPUTF8")).code == 250
        for sep in ("\u2028", "\x85"):  # str.splitlines() ends a line at both
            rcpt = f'"x{sep}{FORGED}"@elsewhere.test'
            assert (await c.cmd(f"RCPT TO:<{rcpt}>")).code == 554
        await c.cmd("QUIT")
        await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    text = stderr_path.read_text(errors="strict")
    lines = text.splitlines()  # as the journal formatter and many readers split
    form = JOURNAL_LINE if journal else PLAIN_LINE
    assert all(form.match(line) for line in lines), [ln for ln in lines if not form.match(ln)]
    starts = [form.sub("", line) for line in lines]
    assert not [s for s in starts if s.startswith("sid=FORGED")]  # no forged record
    assert f"sasl_username=x\\x0a{FORGED}" in text
    assert "\\u2028spamgate.session: sid=FORGED" in text
    assert "\\x85spamgate.session: sid=FORGED" in text
