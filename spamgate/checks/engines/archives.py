"""What an attachment is: file names, the type its first bytes show, zip listings.

Nothing here extracts anything. A zip archive is listed from its central
directory (APPNOTE.TXT §4.3.12-16), which sits at the end of the file: the MIME
walk keeps only a part's last bytes (`mimewalk`), and the listing reads the
names from them, at most `max_entries` of them, so a "zip bomb" (a few KB that
claim terabytes, or a million entries) costs what its first entries cost.
The standard `zipfile` module would read every entry of the directory and wants
the whole file; this reader wants neither, and is about sixty lines.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
_EOCD64 = b"PK\x06\x06"
_CENTRAL = b"PK\x01\x02"

# Magic numbers of what mail filters care about: executables and containers.
_MAGIC = (
    (b"MZ", "exe"),
    (b"\x7fELF", "elf"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip
    (b"Rar!\x1a\x07", "rar"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"\x1f\x8b", "gzip"),
    (b"%PDF-", "pdf"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"),  # doc, xls, msi
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF8", "gif"),
    (b"L\x00\x00\x00\x01\x14\x02\x00", "lnk"),
)
# Document and image extensions, with the kinds their content may be; a program
# under such a name is a disguise.
EXPECTED = {
    "pdf": {"pdf"},
    "jpg": {"jpeg"},
    "jpeg": {"jpeg"},
    "png": {"png"},
    "gif": {"gif"},
    "txt": set(),
    "doc": {"ole"},
    "xls": {"ole"},
    "docx": {"zip"},
    "xlsx": {"zip"},
    "zip": {"zip"},
}
EXECUTABLE = {"exe", "elf", "lnk"}
ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/x-zip"}


def sniff(head: bytes) -> str | None:
    """The kind of file its first bytes show, or None."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return None


def extensions(name: str) -> list[str]:
    """The extensions of a file name, last first, as Windows reads it: trailing dots
    and spaces dropped ("invoice.pdf.exe. " -> ["exe", "pdf"]), lower case."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].rstrip(". \t").lower()
    parts = base.split(".")
    return [p.strip() for p in reversed(parts[1:]) if p.strip()]


@dataclass(frozen=True)
class Listing:
    names: tuple[str, ...] = ()
    encrypted: bool = False  # an entry has the "encrypted" flag
    complete: bool = True  # every entry was read
    problem: str = ""  # why it could not be read (or not all of it)


def zip_listing(tail: bytes, max_entries: int) -> Listing:
    """The names in a zip archive, from its last bytes; never extracts anything."""
    at = tail.rfind(_EOCD, max(0, len(tail) - 65557))  # 22 + a comment of at most 65535
    if at < 0 or len(tail) < at + 22:
        return Listing(complete=False, problem="no zip end record in the bytes kept")
    _, _, _, _, total, size, offset, _ = struct.unpack("<4sHHHHIIH", tail[at : at + 22])
    start = at - size
    if offset == 0xFFFFFFFF or total == 0xFFFF or size == 0xFFFFFFFF:  # zip64
        loc = at - 20
        if loc < 0 or tail[loc : loc + 4] != _EOCD64_LOCATOR:
            return Listing(complete=False, problem="zip64 without its locator")
        rec = tail.rfind(_EOCD64, 0, loc)
        if rec < 0 or len(tail) < rec + 56:
            return Listing(complete=False, problem="zip64 end record not in the bytes kept")
        total, size = struct.unpack("<QQ", tail[rec + 32 : rec + 48])
        start = rec - size
    if start < 0:
        return Listing(complete=False, problem="central directory larger than the bytes kept")
    names: list[str] = []
    encrypted = False
    pos = start
    for _ in range(min(total, max_entries)):
        if tail[pos : pos + 4] != _CENTRAL or len(tail) < pos + 46:
            return Listing(tuple(names), encrypted, False, "damaged central directory")
        flags = struct.unpack("<H", tail[pos + 8 : pos + 10])[0]
        n, m, k = struct.unpack("<HHH", tail[pos + 28 : pos + 34])
        raw = tail[pos + 46 : pos + 46 + n]
        # bit 11: UTF-8 names; otherwise IBM 437 (APPNOTE appendix D)
        names.append(raw.decode("utf-8" if flags & 0x800 else "cp437", "replace"))
        encrypted = encrypted or bool(flags & 1)
        pos += 46 + n + m + k
    if total > max_entries:
        return Listing(tuple(names), encrypted, False, f"more than {max_entries} entries")
    return Listing(tuple(names), encrypted)
