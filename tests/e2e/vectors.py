"""SMTP smuggling vectors (CVE-2023-51764, CVE-2024-27305: bare LF and bare CR
around the end-of-data dot), shared by the sink and Postfix tests.

Each vector is a fake end of data: a "." line with line ends some server reads
loosely. The message puts a whole second transaction after it; a reader that
stopped at the fake end would run that transaction as commands. The only real end
of data is the CRLF "." CRLF at the very end of `smuggling_message`.
"""

from __future__ import annotations

SMUGGLER = "smuggler@evil.test"
VICTIM = "victim@example.test"

FAKE_ENDS: dict[str, bytes] = {
    "lf.crlf": b"\n.\r\n",  # CVE-2024-27305 (aiosmtpd < 1.4.5)
    "lf.lf": b"\n.\n",  # CVE-2023-51764 (Postfix)
    "crlf.lf": b"\r\n.\n",  # CVE-2023-51764 (Postfix)
    "lf.cr": b"\n.\r",
    "crlf.cr": b"\r\n.\r",
    "cr.crlf": b"\r.\r\n",
    "cr.cr": b"\r.\r",
    "cr.lf": b"\r.\n",
    "crlf.cr.crlf": b"\r\n.\r\r\n",
    "crlf.lf.crlf": b"\r\n.\n\r\n",
    "lf.cr.crlf": b"\n.\r\r\n",
    "cr.crlf.lf": b"\r.\r\n\n",
    "crlf.nul.crlf": b"\r\n\x00.\r\n",  # NUL, no bare line end: stays content
}


def smuggled_transaction(marker: str) -> bytes:
    return (
        f"MAIL FROM:<{SMUGGLER}>\r\nRCPT TO:<{VICTIM}>\r\nDATA\r\n"
        f"Subject: smuggled {marker}\r\n\r\nNO SMUGGLING\r\n"
    ).encode()


def smuggling_message(fake_end: bytes, marker: str) -> tuple[bytes, bytes]:
    """(what the client sends after 354, the content before the real end)."""
    content = (
        f"Subject: smuggling test {marker}\r\nFrom: a@example.org\r\n\r\nTesting".encode()
        + fake_end
        + smuggled_transaction(marker)
    )
    return content + b".\r\n", content


def has_bare_line_end(content: bytes) -> bool:
    stripped = content.replace(b"\r\n", b"")
    return b"\r" in stripped or b"\n" in stripped


def normalized(content: bytes) -> bytes:
    """What `bare_newline = "normalize"` must relay: each CRLF line dot-unstuffed,
    then a bare CR made a space and a bare LF a line end (Postfix's rules).
    Written independently of spamgate's own code, as the oracle for it."""
    out = []
    for line in content.split(b"\r\n"):
        if line.startswith(b"."):
            line = line[1:]
        out.append(line.replace(b"\r", b" ").replace(b"\n", b"\r\n"))
    return b"\r\n".join(out)
