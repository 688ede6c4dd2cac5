"""spamgate under the shipped systemd unit's system-call filter.

The unit (deploy/systemd/spamgate.service) denies @privileged and @resources; a
call it denies fails with EPERM. spamgate once started its DKIM worker pool with
os.nice(10) (setpriority): under the unit every worker died, signed mail over
[dkim] inline_size lost dkim=pass, and a forged message from a p=reject domain
was let through as dmarc=temperror. These tests run `spamgate run` as a real
process under the filter read from the unit file itself (tests/kit/syscallfilter.py),
so a change to either the unit or the code that the other does not allow fails
here.
"""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import pathlib
import subprocess
import sys

import pytest

from tests.kit.dkimkeys import Signer, message
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient
from tests.kit.syscallfilter import expand, load_groups, unit_directives, unit_filter

from ..conftest import config_text
from .test_daemon import Notifications, free_port, start

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "spamgate.service"
SIGNER = Signer("signed.test", "sel")
FORGER = Signer("signed.test", "sel", bits=1024)  # not the published key
# Over [dkim] inline_size (16 KiB): verified in a worker process.
BODY = b"".join(b"line %05d of a message long enough for the workers\r\n" % i for i in range(700))


def need_seccomp() -> None:
    if ctypes.util.find_library("seccomp") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("libseccomp is missing in CI: .ci/run must install libseccomp2")
        pytest.skip("libseccomp not installed")


def run_filtered(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.kit.syscallfilter",
            str(UNIT),
            "--",
            sys.executable,
            "-c",
            code,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_unit_filter_is_read_as_systemd_reads_it() -> None:
    groups = load_groups()
    text = UNIT.read_text()
    lines = unit_directives(text, "SystemCallFilter")
    assert lines, "the unit has no SystemCallFilter= any more: drop this test kit"
    spec = unit_filter(text, groups)
    assert spec.allow_list is True and spec.errno == 1  # EPERM
    # every group the unit names is known here (a new one must be added to the list)
    for line in lines:
        for item in line.lstrip("~").split():
            assert expand(item.partition(":")[0], groups)
    assert spec.denies("setpriority") and spec.denies("setrlimit") and spec.denies("setuid")
    assert not spec.denies("prlimit64")  # what glibc's setrlimit() uses: allowed
    for call in ("read", "sendmsg", "epoll_wait", "clone3", "execve", "getrlimit"):
        assert not spec.denies(call), call


def test_the_filter_is_in_force() -> None:
    need_seccomp()
    # what the DKIM pool's workers did: denied, with EPERM
    r = run_filtered("import os\ntry:\n os.nice(10)\nexcept OSError as e:\n print(e.errno)")
    assert (r.returncode, r.stdout.strip()) == (0, "1"), r.stderr
    r = run_filtered("import os; os.getpid(); print('ok')")
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


def publish(dns: DnsServer) -> None:
    spf_soft = "v=spf1 ~all"
    dns.zone(
        "signed.test",
        {
            "@": {"TXT": spf_soft},
            "_dmarc": {"TXT": "v=DMARC1; p=reject"},
            "sel._domainkey": {"TXT": SIGNER.record},
        },
    )
    dns.zone("esp.test", {"@": {"TXT": "v=spf1 ip4:127.0.0.0/8 -all"}})


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
async def sandboxed(request: pytest.FixtureRequest, sink: Sink, dns_server: DnsServer, tmp_path):
    """`spamgate run` under the unit's filter, with SPF, DKIM and DMARC on; by
    itself, and as a supervisor with two workers ([server] workers)."""
    need_seccomp()
    publish(dns_server)
    port = free_port()
    config = tmp_path / "spamgate.toml"
    config.write_text(
        config_text(
            sink,
            "[spf]\nenabled = true\nhelo = false\n[dkim]\nenabled = true\n"
            "[dmarc]\nenabled = true\n",
            server={"listen": f'["127.0.0.1:{port}"]', "workers": str(request.param)},
            dns=dns_server,
        )
    )
    notes = Notifications(tmp_path / "notify")
    stderr = tmp_path / "stderr"
    under = (sys.executable, "-m", "tests.kit.syscallfilter", str(UNIT), "--")
    proc = await start(config, {"NOTIFY_SOCKET": str(notes.path)}, stderr, under)
    try:
        assert (await notes.next()).startswith("READY=1"), stderr.read_text()
        yield port, stderr
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        notes.close()


async def send(port: int, content: bytes) -> int:
    c, _ = await RawClient.connect(port, source="127.0.0.2")
    replies = await c.mail("bounce@esp.test", ["u@example.test"], content, helo="mx.esp.test")
    await c.close()
    return replies[-1].code


async def test_large_signed_mail_is_verified_under_the_unit_filter(sandboxed, sink: Sink) -> None:
    port, stderr = sandboxed
    signed = SIGNER.sign(message("alice@signed.test", body=BODY))
    assert len(signed) > 32 * 1024
    assert await send(port, signed) == 250
    header = sink.messages[0].content.split(b"\r\n\r\n", 1)[0]
    assert b"dkim=pass header.d=signed.test" in header, header
    assert b"dmarc=pass" in header, header
    # forged: signed for signed.test, but not with its key; p=reject applies
    forged = FORGER.sign(message("ceo@signed.test", body=BODY))
    assert await send(port, forged) == 550
    assert len(sink.messages) == 1
    log = stderr.read_text()
    assert "worker process died" not in log
    assert "DKIM worker processes run at normal priority: setpriority() is not permitted" in log
    assert "Traceback" not in log
