"""Messages the content tests (and bench/content.py) send: MIME built by hand, CRLF.

Built by hand rather than with `email.message` so that a test can produce exactly
the malformed or hostile structure it means to (bad base64, deep nesting, odd
headers), byte for byte.
"""

from __future__ import annotations

import base64
import io
import zipfile

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def header(subject: str = "content test", extra: str = "") -> bytes:
    return (
        "From: Sender <sender@example.org>\r\nTo: <u@example.test>\r\n"
        f"Subject: {subject}\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n"
        f"Message-ID: <{abs(hash(subject))}@example.org>\r\nMIME-Version: 1.0\r\n{extra}"
    ).encode()


def plain(text: str, subject: str = "plain") -> bytes:
    return (
        header(subject)
        + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + text.encode().replace(b"\n", b"\r\n")
        + b"\r\n"
    )


def gtube(subject: str = "gtube") -> bytes:
    """A message with the GTUBE line, which rspamd and SpamAssassin score as spam."""
    return plain(f"This is the GTUBE\n{GTUBE}\nGeneric Test for Unsolicited Bulk Email", subject)


# A message neither scanner should find much in.
HAM = plain("Hello, the meeting is moved to Thursday at ten. Regards, Sam", "meeting")


def html_base64(html: str, subject: str = "html", text: str = "see the HTML part") -> bytes:
    """multipart/alternative: a text part and a base64 HTML part."""
    return (
        header(subject)
        + b'Content-Type: multipart/alternative; boundary="=_alt"\r\n\r\n'
        + b"--=_alt\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + text.encode()
        + b"\r\n--=_alt\r\nContent-Type: text/html; charset=utf-8\r\n"
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(html.encode())
        + b"--=_alt--\r\n"
    )


def with_attachment(
    name: str, payload: bytes, ctype: str = "application/octet-stream", subject: str = "file"
) -> bytes:
    return (
        header(subject)
        + b'Content-Type: multipart/mixed; boundary="=_mix"\r\n\r\n'
        + b"--=_mix\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + b"Please find it attached.\r\n"
        + f'--=_mix\r\nContent-Type: {ctype}; name="{name}"\r\n'.encode()
        + f'Content-Disposition: attachment; filename="{name}"\r\n'.encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(payload)
        + b"--=_mix--\r\n"
    )


def zip_of(names: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in names.items():
            zf.writestr(name, data)
    return buf.getvalue()


def newsletter(links: int, size: int = 50_000, domain: str = "news{n}.example") -> str:
    """An HTML newsletter of about `size` bytes with `links` links (bench, tests)."""
    items = []
    for n in range(links):
        host = domain.format(n=n % 40)
        items.append(
            f'<tr><td class="item"><a href="https://{host}/article/{n}?utm_source=mail">'
            f"Story number {n}</a><p>Some words about the story, as newsletters have.</p></td></tr>"
        )
    body = "".join(items)
    filler = max(0, size - len(body) - 200)
    para = "<p>" + ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20) + "</p>"
    pad = (para * (filler // len(para) + 1))[:filler]
    head = "<!DOCTYPE html><html><head><title>News</title></head>"
    return f"{head}<body><table>{body}</table>{pad}</body></html>"
