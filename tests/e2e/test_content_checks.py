"""The content checks in `spamgate check` and `spamgate explain`, and running together."""

from __future__ import annotations

import io
import time

import pytest

from spamgate.app import loads
from spamgate.cli import main
from spamgate.explain import explain
from tests.kit.dnsserver import DnsServer
from tests.kit.mimemaker import html_base64

from ..conftest import GateFactory, config_text


@pytest.mark.parametrize(
    ("toml", "problem"),
    [
        ('[clamav]\naddress = "nowhere"\n', '"nowhere" is not "host:port"'),
        ('[clamav]\naddress = "unix:run/clamd.ctl"\n', "needs an absolute path"),
        ('[spamassassin]\naddress = "localhost"\n', 'is not "host:port"'),
        ('[rspamd]\nurl = "ftp://x"\n', 'is not "http://host:port"'),
        ('[uribl]\nsites = ["dbl.test=127.0.1"]\n', "is not d.d.d.d"),
        ('[uribl]\nallow = ["not a domain"]\n', "is not a domain"),
        ('[attachments]\nextensions = [".exe"]\n', 'write "exe", not ".exe"'),
        ('[attachments]\naction = "drop"\n', "drop"),
    ],
)
def test_check_reports_bad_settings(tmp_path, capsys, toml: str, problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    assert main(["check", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert problem in out, out
    assert f"{path}:" in out  # file:line: as for every setting


def test_check_reads_the_allow_file(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path.parent)
    path = tmp_path / "c.toml"
    path.write_text('[uribl]\nsites = ["dbl.test"]\nallow_file = "allow.txt"\n')
    config = f"{tmp_path.name}/c.toml"
    # missing: at the configuration's line, the file where it is from here
    assert main(["check", "-c", config]) == 1
    out = capsys.readouterr().out
    assert f"{config}:3: [uribl] allow_file: {tmp_path.name}/allow.txt: no such file" in out
    (tmp_path / "allow.txt").write_text("# ours\nexample.org\nbad domain\n")
    assert main(["check", "-c", config]) == 1
    out = capsys.readouterr().out
    assert f'{tmp_path.name}/allow.txt:3: "bad domain" is not a domain' in out
    (tmp_path / "allow.txt").write_text("# ours\nexample.org\n")
    assert main(["check", "-c", config]) == 0


async def test_explain_shows_links_and_lists(dns_server: DnsServer, tmp_path) -> None:
    dns_server.zone("dbl.test", {"listed.test": {"A": "127.0.1.2"}})
    text = config_text(None, '[uribl]\nsites = ["dbl.test=127.0.1.[2..99]"]\n', dns=dns_server)
    out = io.StringIO()
    html = '<a href="http://Listed&#46;Test/x">x</a> <a href="https://clean.test/">y</a>'
    status = await explain(
        loads(text, str(tmp_path / "c.toml")),
        client_ip="192.0.2.1",
        client_name="client.example.net",
        helo="client.example.net",
        sender="a@example.org",
        recipients=["u@example.test"],
        message=html_base64(html),
        out=out,
    )
    shown = out.getvalue()
    assert status == 1
    assert "listed.test (href: listed.test): dbl.test listed 127.0.1.2" in shown
    assert "clean.test (href: clean.test): dbl.test not_listed" in shown
    assert (
        "refused at end of data: 554 5.7.1 Message refused: link to domain [listed.test]" in shown
    )


async def test_content_checks_run_together(
    gate_factory: GateFactory, dns_server: DnsServer, sink
) -> None:
    """A slow list and a slow clamd overlap (Check.concurrent): the end of data takes
    about the longest of the two, not their sum."""
    import asyncio

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    dns_server.zone("dbl.test", {})
    dns_server.delay = 0.6
    try:
        gate = await gate_factory(
            '[uribl]\nsites = ["dbl.test=127.0.1.[2..99]"]\n'
            f'[clamav]\naddress = "127.0.0.1:{port}"\ntimeout = 0.6\n',
            resolver={"lifetime": "3.0", "timeout": "2.0", "reverse_lookup": "false"},
        )
        c, _ = await gate.client(source="127.0.0.2")
        await c.cmd("EHLO client.example.test")
        await c.cmd("MAIL FROM:<a@example.org>")
        await c.cmd("RCPT TO:<u@example.test>")
        assert (await c.cmd("DATA")).code == 354
        started = time.monotonic()
        await c.send(html_base64('<a href="http://clean.test/">x</a>') + b".\r\n")
        reply = await c.reply()
        elapsed = time.monotonic() - started
        await c.close()
    finally:
        server.close()
    assert reply.code == 250  # clamd timed out: on_error = continue; the link is clean
    assert 0.6 <= elapsed < 1.1, elapsed
