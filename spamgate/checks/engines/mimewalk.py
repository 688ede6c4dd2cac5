"""A bounded, streaming walk over a message's MIME parts (RFC 2045, 2046).

The link and attachment checks need different things from the same structure:
the decoded text of the text parts (links), and for every other part its name,
declared type and first bytes, and for archives their last bytes, where the zip
central directory sits (attachments). The standard `email` parser would build
the whole tree in memory, payloads included; a 20 MB spooled message would be
read and copied several times over. This walk reads the message block by block
(`Message.body_blocks`), finds boundaries with `bytes.find`, parses each part's
header block with the `email` package, and decodes only what the caller asked
for, so its memory is bounded by the caller's limits, not by the message.

Every bound is explicit (`WalkLimits`): bytes walked, parts, nesting depth, the
size of one part's header block, decoded bytes kept per part. Reaching one marks
the walk `truncated`; nothing in the message can raise out of it. Malformed
transfer encodings are decoded as far as they go and the part is marked.
"""

from __future__ import annotations

import binascii
import contextlib
import email
import email.header
import email.policy
import email.utils
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.errors import HeaderParseError

from ...message import Message, is_header_line, normal_header

_MAX_CARRY = 65536  # a "line" longer than this is body, whatever it holds
# Bytes outside the base64 alphabet (and "="): dropped before decoding, as RFC 2045
# §6.8 says a decoder must, so that the 4-character quanta stay aligned.
_NOT_B64 = bytes(
    b
    for b in range(256)
    if b not in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
)


@dataclass(frozen=True)
class WalkLimits:
    scan_size: int = 1048576  # bytes of the message walked
    parts: int = 100  # leaf parts looked at
    depth: int = 10  # nested multiparts and message/rfc822
    header_size: int = 65536  # one part's header block
    text_size: int = 51200  # decoded bytes kept of each text part (0: none)
    head_size: int = 0  # decoded bytes kept from the start of other parts


@dataclass
class Part:
    """One leaf part, as far as the walk saw it."""

    index: int
    content_type: str  # lower case, "text/plain" when absent (RFC 2045 §5.2)
    charset: str | None
    filename: str | None  # Content-Disposition filename or Content-Type name, decoded
    disposition: str  # "attachment", "inline" or ""
    encoding: str  # Content-Transfer-Encoding, lower case
    depth: int
    size: int = 0  # bytes seen: decoded while decoding, as transferred after that
    head: bytes = b""  # first bytes, decoded (text parts: up to text_size)
    tail: bytes = b""  # last bytes, decoded, when the caller asked for them
    malformed: bool = False  # the transfer encoding could not be decoded throughout
    truncated: bool = False  # the part went on past the walk's end

    @property
    def is_text(self) -> bool:
        return self.content_type in ("text/plain", "text/html") and self.disposition != "attachment"

    def text(self) -> str:
        """The kept bytes as text, in the part's charset (unknown names: UTF-8)."""
        try:
            return self.head.decode(self.charset or "utf-8", "replace")
        except LookupError:
            return self.head.decode("utf-8", "replace")


@dataclass
class Walk:
    parts: list[Part] = field(default_factory=list)
    truncated: bool = False  # a limit was reached: some of the message was not seen
    why: str = ""  # which limit


# A caller's wish for a part, decided from its headers: bytes of its tail to keep.
TailWish = Callable[[Part], int]


class _Decoder:
    """Incremental transfer decoding of one part, keeping the head and the tail."""

    def __init__(self, part: Part, keep_head: int, keep_tail: int) -> None:
        self.part = part
        self.keep_head = keep_head
        self.keep_tail = keep_tail
        self.head = bytearray()
        self.tail = bytearray()
        self.pending = b""  # base64 characters not yet a multiple of 4; QP partial line
        self.enc = part.encoding if part.encoding in ("base64", "quoted-printable") else "raw"

    @property
    def wants(self) -> bool:
        return self.keep_tail > 0 or len(self.head) < self.keep_head

    def feed(self, data: bytes) -> None:
        if self.enc == "base64":
            data = self.pending + data.translate(None, _NOT_B64)
            cut = len(data) - len(data) % 4
            data, self.pending = data[:cut], data[cut:]
            out = self._b64(data)
        elif self.enc == "quoted-printable":
            data = self.pending + data
            cut = data.rfind(b"\n") + 1
            data, self.pending = data[:cut], data[cut:]
            out = binascii.a2b_qp(data)
        else:
            out = data
        self._keep(out)

    def _b64(self, data: bytes) -> bytes:
        if not data or self.part.malformed:
            return b""
        try:
            return binascii.a2b_base64(data)
        except binascii.Error:
            # Padding in the middle, or a lone trailing character: decode the
            # quanta before the first "=" and stop here.
            self.part.malformed = True
            good = data.split(b"=", 1)[0]
            good = good[: len(good) - len(good) % 4]
            try:
                return binascii.a2b_base64(good)
            except binascii.Error:
                return b""

    def _keep(self, out: bytes) -> None:
        if not out:
            return
        self.part.size += len(out)
        if len(self.head) < self.keep_head:
            self.head += out[: self.keep_head - len(self.head)]
        if self.keep_tail:
            self.tail += out
            if len(self.tail) > 2 * self.keep_tail:
                del self.tail[: len(self.tail) - self.keep_tail]

    def close(self) -> Part:
        if self.pending:
            if self.enc == "base64":
                rest = self.pending.rstrip(b"=")
                if len(rest) % 4 == 1:
                    self.part.malformed = True
                    rest = rest[:-1]
                self._keep(self._b64(rest + b"=" * (-len(rest) % 4)) if rest else b"")
            else:
                self._keep(binascii.a2b_qp(self.pending))
            self.pending = b""
        self.part.head = bytes(self.head)
        self.part.tail = bytes(self.tail[-self.keep_tail :]) if self.keep_tail else b""
        return self.part


def _header_fields(block: bytes) -> email.message.Message:
    """The `email` package's reading of a header section already in Postfix's form
    (`message.normal_header`): it sees the fields Postfix sees, and no others."""
    return email.message_from_bytes(block, policy=email.policy.compat32)


def _decoded_name(raw: str | None) -> str | None:
    """A file name with RFC 2047 encoded words decoded (RFC 2231 is done already)."""
    if raw is None:
        return None
    name = raw
    if "=?" in name:
        with contextlib.suppress(ValueError, LookupError, UnicodeError, HeaderParseError):
            name = str(email.header.make_header(email.header.decode_header(name)))
    return " ".join(name.split())[:255]


class _Walker:
    def __init__(self, limits: WalkLimits, tail: TailWish | None) -> None:
        self.limits = limits
        self.tail_wish = tail
        self.walk = Walk()
        self.boundaries: list[bytes] = []  # innermost last
        self.state = "headers"  # or "body", "skip" (preamble/epilogue), "done"
        self.header = bytearray()
        self.depth = 0
        self.decoder: _Decoder | None = None
        self.container_depths: list[int] = []

    # -- the structure -------------------------------------------------------------

    def start_entity(
        self, fields: email.message.Message, depth: int, *, nested: bool = True
    ) -> None:
        """An entity's header block is complete: a container, or a leaf to decode."""
        ctype = fields.get_content_type()
        if fields.get_content_maintype() == "multipart":
            boundary = fields.get_param("boundary")
            if isinstance(boundary, tuple):  # RFC 2231 form
                boundary = email.utils.collapse_rfc2231_value(boundary)
            if boundary and depth < self.limits.depth:
                self.boundaries.append(b"--" + str(boundary).encode("utf-8", "surrogateescape"))
                self.container_depths.append(depth)
                self.state = "skip"  # the preamble
                return
            if boundary:
                self.stop("nesting deeper than the limit")
                return
            ctype = "text/plain"  # a multipart without a boundary: RFC 2046 §5.1.1
        if ctype == "message/rfc822" and nested and depth < self.limits.depth:
            encoding = str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower()
            if encoding in ("7bit", "8bit", "binary"):
                self.state = "headers"  # the enclosed message's own header block
                self.depth = depth + 1
                return
        if len(self.walk.parts) >= self.limits.parts:
            self.stop(f"more than {self.limits.parts} parts")
            return
        charset = fields.get_content_charset()
        disposition = (fields.get_content_disposition() or "").lower()
        part = Part(
            index=len(self.walk.parts),
            content_type=ctype,
            charset=charset,
            filename=_decoded_name(_filename(fields)),
            disposition=disposition,
            encoding=str(fields.get("Content-Transfer-Encoding", "7bit")).strip().lower(),
            depth=depth,
        )
        self.walk.parts.append(part)
        keep = self.limits.text_size if part.is_text else self.limits.head_size
        wish = self.tail_wish(part) if self.tail_wish is not None else 0
        self.decoder = _Decoder(part, keep, wish)
        self.state = "body"

    def end_header(self, *, nested: bool) -> None:
        """The header block of the current entity is complete; `nested`: it ended
        with an empty line, so a message/rfc822 part's own header block follows."""
        fields = _header_fields(normal_header(bytes(self.header)))
        self.header.clear()
        self.start_entity(fields, self.depth, nested=nested)

    def end_part(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None

    def stop(self, why: str) -> None:
        self.end_part()
        self.walk.truncated = True
        self.walk.why = self.walk.why or why
        self.state = "done"

    def boundary(self, line: bytes) -> bool:
        """Handle `line` if it is a boundary of an open multipart; True if it was."""
        stripped = line.rstrip(b" \t\r\n")
        for level in range(len(self.boundaries) - 1, -1, -1):
            b = self.boundaries[level]
            if not stripped.startswith(b):
                continue
            rest = stripped[len(b) :]
            if rest not in (b"", b"--"):
                continue
            self.end_part()
            depth = self.container_depths[level]
            del self.boundaries[level + 1 :]
            del self.container_depths[level + 1 :]
            if rest == b"--":  # this multipart ends: its epilogue follows
                self.boundaries.pop()
                self.container_depths.pop()
                self.state = "skip"
            else:
                self.state = "headers"
                self.header.clear()
                self.depth = depth + 1
            return True
        return False

    # -- the bytes --------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Complete lines (or a forced chunk) of the body, in order."""
        pos, end = 0, len(data)
        while pos < end and self.state != "done":
            if self.state == "headers":
                stop = data.find(b"\n", pos)
                stop = end if stop < 0 else stop + 1
                line = data[pos:stop]
                if line in (b"\r\n", b"\n"):
                    pos = stop
                    self.end_header(nested=True)
                    continue
                if self.boundaries and line.startswith(b"--") and self.boundary(line):
                    pos = stop
                    continue
                if not (self.header and line[:1] in (b" ", b"\t")) and not is_header_line(line):
                    # Neither a field nor the rest of one: the header block ends
                    # here and this line is body, as Postfix reads a part (and
                    # then does not look for a message inside it).
                    self.end_header(nested=False)
                    continue
                pos = stop
                self.header += line
                if len(self.header) > self.limits.header_size:
                    self.stop("a part's header block is larger than the limit")
                continue
            # body or skip: a line that may be a boundary, or up to the next one
            if self.boundaries and data.startswith(b"--", pos):
                stop = data.find(b"\n", pos)
                stop = end if stop < 0 else stop + 1
                line = data[pos:stop]
                pos = stop
                if not self.boundary(line):
                    self.body(line)
                elif self.state == "skip" and not self.boundaries:
                    self.state = "done"  # the outermost multipart ended: epilogue only
                continue
            nxt = data.find(b"\n--", pos) if self.boundaries else -1
            stop = end if nxt < 0 else nxt + 1
            self.body(data[pos:stop])
            pos = stop

    def body(self, chunk: bytes) -> None:
        decoder = self.decoder
        if decoder is None:
            return
        if decoder.wants:
            decoder.feed(chunk)
        else:
            decoder.part.size += len(chunk)  # not decoded: counted as it came


def _filename(fields: email.message.Message) -> str | None:
    try:
        return fields.get_filename()
    except (ValueError, LookupError, UnicodeError):
        return None


def walk(
    message: Message,
    limits: WalkLimits,
    tail: TailWish | None = None,
    blocks: Iterable[bytes] | None = None,
) -> Walk:
    """Walk `message` within `limits`; `tail(part)` says how many of a part's last
    decoded bytes to keep (archives). Blocks on file reads for a spooled message:
    call it in a worker thread then."""
    w = _Walker(limits, tail)
    w.start_entity(_header_fields(message.header_section), 0)
    walked = len(message.header_bytes)
    carry = b""
    for block in blocks if blocks is not None else message.body_blocks():
        if w.state == "done":
            break
        room = limits.scan_size - walked
        if room <= 0:
            w.stop(f"message larger than {limits.scan_size} bytes")
            break
        if len(block) > room:
            block = block[:room]
        walked += len(block)
        data = carry + block
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) <= _MAX_CARRY:
            carry = data
            continue
        if cut == 0:
            cut = len(data)
        carry = data[cut:]
        w.feed(data[:cut])
    if carry and w.state != "done":
        w.feed(carry + b"\r\n")
    if walked >= limits.scan_size and message.size > limits.scan_size:
        w.walk.truncated = True
        w.walk.why = w.walk.why or f"message larger than {limits.scan_size} bytes"
        if w.decoder is not None:
            w.decoder.part.truncated = True
    w.end_part()
    return w.walk
