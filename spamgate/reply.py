"""SMTP replies as values.

Every answer spamgate gives, whether its own or relayed from the upstream, is a
`Reply`: the code, the RFC 3463 enhanced status code and the text are kept apart so
that a verdict can supply only text and get the right enhanced code, and so that an
upstream reply can be relayed without re-parsing.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
# Reply text goes onto the wire; anything that could end the line or start a new
# reply is flattened so that no caller can inject a second reply.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. `lines` holds the text of each line, without code."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    @classmethod
    def make(cls, code: int, text: str = "", enhanced: str | None = None) -> Reply:
        """Build a reply; `text` may already start with an enhanced code."""
        lines = tuple(text.split("\n")) if text else ("",)
        first = lines[0]
        match = _ENHANCED.match(first)
        if match and enhanced is None and match.group(1) == str(code)[0]:
            enhanced = first[: match.end()].strip()
            lines = (first[match.end() :], *lines[1:])
        return cls(code, enhanced, tuple(_UNSAFE.sub(" ", line) for line in lines))

    @classmethod
    def from_upstream(cls, code: int, message: str) -> Reply:
        """A reply as aiosmtplib reports it: lines joined by newlines, codes stripped.

        Each line of a multi-line reply may repeat the enhanced code; only the first
        one is kept apart, the others stay as text, so the relayed reply is verbatim.
        """
        return cls.make(code, message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def closes(self) -> bool:
        """421 and 521 end the session after they are sent (RFC 5321 §3.8, RFC 7504)."""
        return self.code in (421, 521)

    def render(self, *, enhanced: bool = True) -> bytes:
        """Wire form, CRLF-terminated; continuation lines use `code-`."""
        if enhanced:
            return _rendered(self)
        return self._render(enhanced)

    def _render(self, enhanced: bool) -> bytes:
        out = []
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            sep = " " if i == last else "-"
            prefix = f"{self.code}{sep}"
            if enhanced and self.enhanced and not _ENHANCED.match(line):
                body = f"{self.enhanced} {line}" if line else self.enhanced
            else:
                body = line
            out.append(f"{prefix}{body}".rstrip() + "\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        return self.render().decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", " / ")


@functools.lru_cache(maxsize=1024)
def _rendered(reply: Reply) -> bytes:
    """The same few replies go out for every message: rendered once each."""
    return reply._render(True)


def default_enhanced(code: int) -> str:
    """The enhanced code a bare policy reply gets, as Postfix's access(5) does."""
    if 400 <= code < 500:
        return "4.7.1"
    if code >= 500:
        return "5.7.1"
    return "2.0.0"


# Replies the core gives, in one place so that tests and docs can name them.
OK = Reply(250, "2.0.0", ("Ok",))
TEMP_UPSTREAM = Reply(451, "4.3.0", ("Error: queue file write error",))
