"""Attachments by name, sniffed type and zip contents, over real sockets."""

from __future__ import annotations

import io
import resource
import struct
import time
import zipfile

from spamgate.checks.engines.archives import extensions, zip_listing
from tests.kit.mimemaker import b64, header, plain, with_attachment, zip_of
from tests.kit.sink import Sink

from ..conftest import GateFactory, sample

ON = "[attachments]\nenabled = true\n"
EXE = b"MZ\x90\x00" + b"\x00" * 2000


async def test_exe_inside_zip_refused(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(ON)
    member = sample("spamgate_attachment_findings_total", kind="archive_member")
    archive = zip_of({"readme.txt": b"hello", "docs/Invoice.PDF.exe": EXE})
    replies = await gate.send(with_attachment("invoice.zip", archive, "application/zip"))
    assert replies[-1].code == 554
    assert replies[-1].text == (
        "5.7.1 Message refused: attachment invoice.zip contains docs/Invoice.PDF.exe "
        "is of a blocked type"
    )
    assert sink.messages == []
    assert sample("spamgate_attachment_findings_total", kind="archive_member") == member + 1


async def test_names_and_disguises(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(ON)
    for name, payload, why in (
        ("setup.exe", EXE, "(.exe)"),
        ("invoice.pdf.exe", EXE, "invoice.pdf.exe (.exe)"),
        ("invoice.js. ", b"var a;", "(.js)"),  # Windows drops trailing dots and spaces
        ("=?utf-8?b?cmVwb3J0LnNjcg==?=", b"x", "report.scr"),  # RFC 2047 name
        ("scan.pdf", EXE, "scan.pdf is really exe"),  # an executable under a PDF's name
        ("photo.ISO", b"\x00" * 100, "(.iso)"),
    ):
        replies = await gate.send(with_attachment(name, payload, subject=name))
        assert replies[-1].code == 554, name
        assert why in replies[-1].text, replies[-1].text
    # RFC 2231 continuation of the file name
    body = (
        header("2231")
        + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\n'
        + b"Content-Type: application/octet-stream\r\n"
        + b'Content-Disposition: attachment; filename*0="in"; filename*1="voice.vbs"\r\n'
        + b"\r\nx\r\n--b--\r\n"
    )
    assert (await gate.send(body))[-1].code == 554
    assert sink.messages == []


async def test_harmless_attachments_accepted(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(ON)
    pdf = b"%PDF-1.7\n" + b"0" * 3000
    archive = zip_of({"report.pdf": pdf, "data.csv": b"a,b\n"})
    for body in (
        with_attachment("report.pdf", pdf, "application/pdf"),
        with_attachment("reports.zip", archive, "application/zip"),
        plain("no attachment at all"),
    ):
        assert (await gate.send(body))[-1].code == 250
    assert len(sink.messages) == 3


async def test_exe_after_a_large_attachment(gate_factory: GateFactory, sink: Sink) -> None:
    """Past the first megabyte (where header and body rules stop reading)."""
    gate = await gate_factory(ON + "\n[limits]\nmessage_size = 30000000\n")
    big = b"%PDF-1.7\n" + bytes(range(256)) * 8000  # 2 MB
    body = (
        header("two")
        + b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        + b'--m\r\nContent-Type: application/pdf; name="big.pdf"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(big)
        + b'--m\r\nContent-Type: application/octet-stream; name="tool.exe"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(EXE)
        + b"--m--\r\n"
    )
    replies = await gate.send(body)
    assert replies[-1].code == 554 and "tool.exe" in replies[-1].text


async def test_score_and_hold_actions(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(ON + 'action = "score"\nscore = 4.0\n\n[scoring]\ntag = 1\n')
    replies = await gate.send(with_attachment("run.bat", b"@echo off"))
    assert replies[-1].code == 250
    assert b"X-Spam-Symbols: ATTACHMENT_BLOCKED" in sink.messages[0].content
    gate = await gate_factory(ON + 'action = "hold"\n')
    replies = await gate.send(with_attachment("run.bat", b"@echo off", subject="hold"))
    assert replies[-1].code == 250
    assert len(sink.messages) == 1  # the second went to quarantine, not upstream


# -- bad input ---------------------------------------------------------------------------


def zip_bomb_listing(entries: int) -> bytes:
    """A small zip whose central directory claims `entries` entries of 4 GB each."""
    central = b""
    for n in range(min(entries, 3000)):
        name = f"f{n}.txt".encode()
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02", 20, 20, 0, 8, 0, 0, 0, 1000, 0xFFFFFFFE, len(name), 0, 0, 0, 0, 0, 0,
        ) + name  # fmt: skip
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFE, 0xFFFE, len(central), 0, 0)
    return central + end


async def test_zip_bomb_listing_bounded(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(ON + "\n[scoring]\ntag = 1\n")
    started = time.monotonic()
    replies = await gate.send(with_attachment("bomb.zip", zip_bomb_listing(65534)))
    assert replies[-1].code == 250  # nothing blocked in it, nothing extracted
    assert time.monotonic() - started < 5
    content = sink.messages[0].content
    assert b"ATTACHMENT_UNREADABLE" in content  # not all of it could be listed
    # a directory damaged on purpose: unreadable, not a crash
    replies = await gate.send(with_attachment("bad.zip", b"PK\x05\x06" + b"\xff" * 18, subject="b"))
    assert replies[-1].code == 250


def test_zip_listing_reads_only_the_end() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("big.bin", b"\x00" * 200_000)
        zf.writestr("a/evil.exe", b"MZ")
    data = buf.getvalue()
    listing = zip_listing(data[-1000:], 100)  # only the last kilobyte
    assert listing.names == ("big.bin", "a/evil.exe") and listing.complete
    assert zip_listing(data[-20:], 100).problem
    many = zip_listing(zip_bomb_listing(65534), 50)
    assert len(many.names) == 50 and not many.complete


def test_extensions() -> None:
    assert extensions("Invoice.PDF.exe") == ["exe", "pdf"]
    assert extensions("a/b\\c.tar.gz. . ") == ["gz", "tar"]
    assert extensions("noext") == []


async def test_twenty_megabytes_bounded(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(ON + "\n[limits]\nmessage_size = 30000000\n")
    archive = zip_of({f"file{n}.txt": b"x" * 1000 for n in range(100)} | {"x.scr": b"MZ"})
    big = bytes(range(256)) * 60000  # 15 MB
    body = (
        header("big zip")
        + b'Content-Type: multipart/mixed; boundary="m"\r\n\r\n'
        + b'--m\r\nContent-Type: application/zip; name="big.zip"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(big + archive)  # a zip with 15 MB of something before it
        + b"--m--\r\n"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    replies = await gate.send(body)
    assert replies[-1].code == 554 and "x.scr" in replies[-1].text
    assert time.monotonic() - started < 20
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024 < 100
