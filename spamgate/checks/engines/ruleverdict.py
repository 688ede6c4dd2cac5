"""From a matched rule to a verdict: what an access(5) action means for the mail.

Replies follow Postfix's form, `<name>: Client host rejected: text`, and end with
the rule that fired (`(helo.regexp:12)`) so whoever reads a bounce can point the
admin at the line; only the table's file name is shown, never its directory. A
reply text without an enhanced status code gets 5.7.1 (reject) or 4.7.1 (defer),
as in Postfix.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ...pipeline.verdict import Action, CheckError, Symbol, Verdict
from ...reply import Reply, default_enhanced
from ...tables import TableTimeout
from ...tables.actions import RuleAction

_HEADER = re.compile(r"^([!-9;-~]+):[ \t]*(.*)$", re.S)
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_REPLY_TEXT = 400  # keeps a reply line well under RFC 5321's 512 octets
MAX_HEADER = 998


class RuleTimeout(CheckError):
    """A table lookup took longer than its bound (a regexp that backtracks, a huge
    input): the check's `on_error` applies, counted as a timeout."""

    kind = "timeout"


@contextlib.contextmanager
def lookups() -> Iterator[None]:
    """Table lookups in this block that run out of time end the check as a timeout."""
    try:
        yield
    except TableTimeout as exc:
        raise RuleTimeout(str(exc)) from None


@dataclass(frozen=True, slots=True)
class ReplyContext:
    """How a stage words its refusals, like Postfix's `<name>: Class rejected: text`."""

    name: str = ""  # the thing looked up, shown in <...>; "" for content
    what: str = ""  # "Client host", "Helo command", ...; "" for content
    reject_code: int = 554  # Postfix access_map_reject_code
    defer_code: int = 450  # Postfix access_map_defer_code
    reject_text: str = "Access denied"
    defer_text: str = "Access denied"


def to_verdict(action: RuleAction, rule: str, ctx: ReplyContext) -> Verdict:
    """The verdict for one matched rule; `rule` is `table:line`."""
    word = action.word
    if word == "OK":
        return Verdict(Action.OK, rule=rule)
    if word == "DUNNO":
        return Verdict(rule=rule)
    if word == "WARN":
        return Verdict(warn=_clean(action.text) or "(no text)", rule=rule)
    if word == "SCORE":
        return Verdict(symbols=(Symbol(action.symbol, action.score),), rule=rule)
    if word == "PREPEND":
        name, _, value = _clean(action.text).partition(":")
        header = (name.strip(), value.strip()[:MAX_HEADER])
        if not _HEADER.match(f"{header[0]}:"):
            # A $1 substitution made the name invalid: keep the mail flowing, say so.
            return Verdict(warn=f"PREPEND produced an invalid header name {name!r}", rule=rule)
        return Verdict(headers=(header,), rule=rule)
    if word in ("DISCARD", "HOLD"):
        kind = Action.DISCARD if word == "DISCARD" else Action.HOLD
        return Verdict(kind, warn=_clean(action.text) or None, rule=rule, monitor=action.monitor)
    if word == "REJECT":
        code, default = ctx.reject_code, ctx.reject_text
    elif word == "DEFER":
        code, default = ctx.defer_code, ctx.defer_text
    else:
        assert action.code is not None
        code, default = action.code, (ctx.reject_text if action.code >= 500 else ctx.defer_text)
    reply = _reply(code, action.text, default, ctx, rule)
    if code in (421, 521):
        kind = Action.DISCONNECT
    else:
        kind = Action.REJECT if code >= 500 else Action.DEFER
    return Verdict(kind, reply, rule=rule, monitor=action.monitor)


def _clean(text: str) -> str:
    return _CONTROL.sub(" ", text).strip()


def _reply(code: int, text: str, default: str, ctx: ReplyContext, rule: str) -> Reply:
    text = _clean(text)
    enhanced = None
    m = _ENHANCED.match(text)
    if m:
        # Postfix corrects the class of an enhanced code to match the reply code.
        enhanced = f"{str(code)[0]}.{m.group(2)}.{m.group(3)}"
        text = text[m.end() :]
    body = text or default
    if ctx.what:
        body = f"<{ctx.name}>: {ctx.what} rejected: {body}"
    if len(body) > MAX_REPLY_TEXT:
        body = body[: MAX_REPLY_TEXT - 3] + "..."
    return Reply(code, enhanced or default_enhanced(code), (f"{body} ({rule})",))
