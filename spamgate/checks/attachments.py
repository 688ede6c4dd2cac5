"""Attachments by file name, type and archive contents, at end of data.

What Postfix admins block with mime_header_checks, done with the MIME structure
rather than a regular expression over header lines: the file name of every part
(Content-Disposition filename, Content-Type name; RFC 2231 and RFC 2047 forms
decoded) is judged by its last extension, as Windows reads it (trailing dots
and spaces dropped), so `invoice.pdf.exe` and `invoice.exe.` are caught; a
part whose first bytes show an executable under a harmless name (`scan.pdf`
that starts with "MZ") is a disguise; and the names inside zip archives are
read from the central directory (listing only, never extracting: `engines/archives.py`).

The whole message is walked (up to `scan_size`), not only its first megabyte:
an executable after a large harmless attachment is still seen. Memory stays
bounded: per part only its first bytes and, for archives, its last
`archive_size` bytes are kept. What is found refuses the message (554 5.7.1),
holds it in quarantine, or adds a score symbol, as `action` says.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..config.settings import non_negative, positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Action, Symbol, Verdict
from ..reply import Reply
from .engines.archives import EXECUTABLE, EXPECTED, ZIP_TYPES, extensions, sniff, zip_listing
from .engines.mimewalk import Part, WalkLimits, walk

if TYPE_CHECKING:
    from ..config import Config
    from ..message import Message
    from ..services import Services

INLINE_LIMIT = 16384

# What Postfix admins commonly refuse (executables, scripts, shortcuts, disk images).
DEFAULT_EXTENSIONS = [
    "ade", "adp", "app", "appx", "bat", "cab", "chm", "cmd", "com", "cpl", "dll",
    "exe", "hta", "img", "inf", "ins", "iso", "isp", "jar", "js", "jse", "lib", "lnk",
    "mde", "msc", "msi", "msix", "msp", "mst", "pif", "ps1", "reg", "scr", "sct",
    "shb", "shs", "sys", "vb", "vbe", "vbs", "vhd", "vhdx", "vxd", "wsc", "wsf", "wsh",
]  # fmt: skip


def _extensions(value: list[str]) -> str | None:
    for item in value:
        if not item or "." in item or "/" in item or " " in item:
            return f'"{item}" is not an extension (write "exe", not ".exe")'
    return None


@dataclass(frozen=True)
class AttachmentSettings:
    enabled: bool = setting(False, "Judge attachments by name, type and archive contents.")
    extensions: list[str] = setting(
        DEFAULT_EXTENSIONS,
        "File name extensions refused (the last one counts: invoice.pdf.exe is exe).",
        check=_extensions,
    )
    action: Literal["reject", "hold", "score"] = setting(
        "reject",
        'A blocked attachment: "reject" (554 5.7.1), "hold" (quarantine) or "score" '
        "(symbol ATTACHMENT_BLOCKED with `score`).",
    )
    score: float = setting(10.0, "Score of ATTACHMENT_BLOCKED when action is score.")
    mismatch: bool = setting(
        True,
        "Treat an executable whose name claims another type (scan.pdf starting with MZ) "
        "as blocked.",
    )
    archives: bool = setting(True, "List the names inside zip archives and judge them too.")
    archive_size: int = setting(
        1048576,
        "Last bytes of an archive kept to read its directory; an archive whose directory "
        "is larger is unreadable.",
        check=positive,
    )
    archive_entries: int = setting(
        1000, "Archive entries listed at most (the rest: unreadable).", check=positive
    )
    unreadable_score: float = setting(
        3.0,
        "Score of ATTACHMENT_UNREADABLE: an archive that could not be listed in full, or "
        "is encrypted (a common way to carry malware past scanners); 0: none.",
        check=non_negative,
    )
    scan_size: int = setting(52428800, "Bytes of a message walked for attachments.", check=positive)
    parts: int = setting(500, "MIME parts looked at.", check=positive)
    on_error: Literal["continue", "tempfail"] = setting(
        "continue", 'The check failing (time-out): "continue" or "tempfail" (451).'
    )


@dataclass(frozen=True)
class Finding:
    kind: str  # extension, double_extension, archive_member, type_mismatch, archive_unreadable
    name: str  # the part's file name (or the archive's)
    detail: str  # the extension, the member's name, the sniffed type, the problem

    def describe(self) -> str:
        if self.kind == "archive_member":
            return f"{self.name} contains {self.detail}"
        if self.kind == "type_mismatch":
            return f"{self.name} is really {self.detail}"
        if self.kind == "archive_unreadable":
            return f"{self.name}: {self.detail}"
        return f"{self.name} (.{self.detail})"


@dataclass(frozen=True)
class AttachmentResult:
    names: tuple[str, ...] = ()  # attachment file names seen
    findings: tuple[Finding, ...] = ()
    blocked: bool = False
    scored: bool = False
    truncated: str = ""

    def counted(self):
        outcome = (
            "blocked"
            if self.blocked
            else "scored"
            if self.scored
            else "clean"
            if self.names
            else "none"
        )
        yield "spamgate_content_scans_total", ("attachments", outcome)
        for f in self.findings:
            yield "spamgate_attachment_findings_total", (f.kind,)

    def explain(self) -> list[str]:
        out = ["attachments: " + (", ".join(self.names[:10]) or "none")]
        out += [f"{f.kind}: {f.describe()}" for f in self.findings[:10]]
        if self.truncated:
            out.append(f"not all seen: {self.truncated}")
        return out


class AttachmentCheck(Check):
    section = ("attachments", AttachmentSettings)
    name = "attachments"
    stages = frozenset({Stage.EOD})
    concurrent = True

    def __init__(self, settings: AttachmentSettings) -> None:
        self.settings = settings
        self.blocked = frozenset(e.lower() for e in settings.extensions)
        self.on_error = settings.on_error
        self.timeout = 30.0  # the runner's backstop: a 50 MB walk takes well under a second
        self.limits = WalkLimits(
            scan_size=settings.scan_size, parts=settings.parts, text_size=0, head_size=16
        )

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: AttachmentSettings = config.section("attachments")
        return [cls(s)] if s.enabled else []

    def metric_series(self):
        for outcome in ("clean", "blocked", "scored", "none"):
            yield "spamgate_content_scans_total", ("attachments", outcome)

    def _tail(self, part: Part) -> int:
        if not self.settings.archives:
            return 0
        zipped = part.content_type in ZIP_TYPES or (
            part.filename is not None and extensions(part.filename)[:1] == ["zip"]
        )
        return self.settings.archive_size if zipped else 0

    def inspect(self, message: Message) -> AttachmentResult:
        """Walk the message and judge each named part (blocks: see mimewalk.walk)."""
        found = walk(message, self.limits, self._tail)
        names: list[str] = []
        findings: list[Finding] = []
        for part in found.parts:
            kind = sniff(part.head)
            name = part.filename
            if name is None and kind not in EXECUTABLE:
                continue
            name = name or f"(unnamed {part.content_type})"
            names.append(name)
            findings += self._judge_name(name)
            exts = extensions(name)
            claimed = exts[0] if exts else ""
            if self.settings.mismatch and kind in EXECUTABLE and (claimed in EXPECTED or not exts):
                # a program under a document's name, or under none
                findings.append(Finding("type_mismatch", name, kind))
            if part.tail:
                listing = zip_listing(part.tail, self.settings.archive_entries)
                for member in listing.names:
                    if any(e in self.blocked for e in extensions(member)[:1]):
                        findings.append(Finding("archive_member", name, member))
                if listing.encrypted:
                    findings.append(Finding("archive_unreadable", name, "encrypted"))
                if not listing.complete:
                    findings.append(Finding("archive_unreadable", name, listing.problem))
        blocked = any(f.kind != "archive_unreadable" for f in findings)
        scored = any(f.kind == "archive_unreadable" for f in findings)
        return AttachmentResult(tuple(names), tuple(findings), blocked, scored, found.why)

    def _judge_name(self, name: str) -> list[Finding]:
        exts = extensions(name)
        if not exts or exts[0] not in self.blocked:
            return []
        kind = "double_extension" if len(exts) > 1 and exts[1] not in self.blocked else "extension"
        return [Finding(kind, name, exts[0])]

    async def check(self, ctx: CheckContext) -> Verdict:
        message = ctx.message
        if message is None:
            return DUNNO
        if message.size > INLINE_LIMIT or message.path is not None:
            result = await asyncio.to_thread(self.inspect, message)
        else:
            result = self.inspect(message)
        return self.decide(result)

    def decide(self, result: AttachmentResult) -> Verdict:
        s = self.settings
        symbols: list[Symbol] = []
        if result.scored and s.unreadable_score:
            symbols.append(Symbol("ATTACHMENT_UNREADABLE", s.unreadable_score))
        if not result.blocked:
            return Verdict(symbols=tuple(symbols), result=result)
        first = next(f for f in result.findings if f.kind != "archive_unreadable")
        rule = f"attachments:{first.kind}"
        if s.action == "score":
            symbols.append(Symbol("ATTACHMENT_BLOCKED", s.score))
            return Verdict(symbols=tuple(symbols), result=result, rule=rule)
        if s.action == "hold":
            return Verdict(Action.HOLD, symbols=tuple(symbols), rule=rule, result=result)
        text = f"Message refused: attachment {_printable(first.describe())} is of a blocked type"
        return Verdict(
            Action.REJECT,
            Reply.make(554, text, "5.7.1"),
            symbols=tuple(symbols),
            rule=rule,
            result=result,
        )


def _printable(text: str) -> str:
    """A file name in an SMTP reply: printable ASCII only, and short."""
    out = "".join(ch if " " <= ch <= "~" else "?" for ch in text)
    return out if len(out) <= 120 else out[:117] + "..."
