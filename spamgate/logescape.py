"""Log lines that a client cannot forge: control characters escaped at the handler.

Log lines carry what clients said (HELO names, addresses, the AUTH PLAIN
authorization identity, DNS answers about their names). A newline in one of
them would start a line of the client's making, such as a fake
"auth: PLAIN succeeded, sasl_username=admin". Escaping at each call would miss
the next one written, so it happens once, where a record becomes text: the
filter below, on every handler spamgate installs, replaces each character that
can end, hide or reorder a line with a visible escape (`\\x0a`, `\\u2028`), in
the message and in the exception text of a traceback. Everything else, any
script's letters included, is logged as it came.
"""

from __future__ import annotations

import logging
import re
import traceback

# C0 and C1 controls and DEL (a newline, a carriage return, NEL, ANSI escape
# sequences); Unicode line and paragraph separators (str.splitlines() and some
# log viewers end a line there); bidirectional controls, which reorder what is
# shown; lone surrogates (undecodable bytes kept by "surrogateescape"), which
# the stream cannot even encode.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _escape_one(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """`text` with every character that could forge or hide a log line escaped."""
    return _UNSAFE.sub(_escape_one, text) if _UNSAFE.search(text) else text


class EscapeFilter(logging.Filter):
    """A handler filter: the record's message, and the messages of its exception
    chain, with `escape()` applied; the traceback's own line breaks stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = escape(message)
        if safe is not message:
            record.msg, record.args = safe, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = _traceback(record.exc_info[1])
        return True


def _traceback(exc: BaseException) -> str:
    """The traceback as logging would format it, with each exception's message
    (and notes) escaped: the part of a traceback a client's words can reach."""
    te = traceback.TracebackException.from_exception(exc)
    seen: set[int] = set()
    stack = [te]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        text = getattr(current, "_str", None)  # what format_exception_only prints
        if isinstance(text, str):
            current._str = escape(text)  # type: ignore[attr-defined]
        notes = getattr(current, "__notes__", None)
        if notes:
            current.__notes__ = [escape(str(n)) for n in notes]
        stack += [e for e in (current.__cause__, current.__context__) if e is not None]
    return "".join(te.format()).rstrip("\n")


def install(handler: logging.Handler) -> logging.Handler:
    """Give `handler` the escaping filter (once); returns it."""
    if not any(isinstance(f, EscapeFilter) for f in handler.filters):
        handler.addFilter(EscapeFilter())
    return handler
