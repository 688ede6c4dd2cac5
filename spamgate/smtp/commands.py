"""Parsing of MAIL FROM / RCPT TO arguments and HELO names, as plain functions.

These run on every command, so they are strict where it matters for safety (no
control characters, no unquoted spaces, nothing that could change the meaning of
the command we send upstream) and lenient where real mail needs it (long
local-parts, quoted local-parts, a space after the colon).
Each returns either the parsed value or the `Reply` to give.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .. import xtext
from ..domains import ascii_lower
from ..reply import Reply

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\x80-\U0010ffff]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\U0010ffff]|\\[\x20-\x7e])*"$')
_LABEL = (
    r"(?:[A-Za-z0-9\x80-\U0010ffff](?:[A-Za-z0-9\-\x80-\U0010ffff]*[A-Za-z0-9\x80-\U0010ffff])?)"
)
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_LITERAL = re.compile(
    r"^\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+|[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+)\]$"
)
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]*$")
_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}
_SIZE = re.compile(r"^[0-9]{1,20}$")  # not str.isdigit(): that takes any script's digits
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")  # RFC 3461 §4.2 addr-type (atom)

MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}


@dataclass(frozen=True, slots=True)
class PathArg:
    address: str  # without angle brackets; "" for the null sender
    params: tuple[str, ...]  # verbatim, as the client sent them
    keywords: dict[str, str | None]  # upper-cased keyword -> value


def _syntax(kind: str) -> Reply:
    return Reply(501, "5.5.4", (f"Syntax: {kind}",))


def _split_path(arg: str) -> tuple[str, str] | None:
    """Split "<path> params" honouring quoted strings inside the path."""
    if not arg.startswith("<"):
        return None
    quoted = escaped = False
    for i, ch in enumerate(arg):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return arg[1:i], arg[i + 1 :]
    return None


def valid_mailbox(address: str, *, utf8: bool) -> bool:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    if not utf8 and not address.isascii():
        return False
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        return False
    if len(domain) > 255:
        return False
    return bool(_DOMAIN.match(domain) or _LITERAL.match(domain))


def parse_path(
    arg: str | None,
    keyword: str,
    *,
    allowed: set[str],
    esmtp: bool,
    utf8_declared: bool = False,
) -> PathArg | Reply:
    """Parse `FROM:<addr> params` (keyword "FROM") or `TO:<addr> params` ("TO")."""
    usage = f"{'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>"
    if arg is None or arg[: len(keyword) + 1].upper() != f"{keyword}:":
        return _syntax(usage)
    rest = arg[len(keyword) + 1 :].lstrip(" ")
    if _CONTROL.search(rest):
        return _syntax(usage)
    split = _split_path(rest)
    if split is None:
        return _syntax(usage)
    path, tail = split
    if tail and not tail.startswith(" "):
        return _syntax(usage)
    params = tuple(tail.split())
    if params and not esmtp:
        return Reply(555, "5.5.4", ("Error: parameters need EHLO",))
    keywords: dict[str, str | None] = {}
    for param in params:
        key, eq, value = param.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            return Reply(501, "5.5.4", (f"Bad parameter syntax: {param[:40]}",))
        ukey = key.upper()
        if ukey not in allowed:
            return Reply(555, "5.5.4", (f"Unsupported option: {key[:40]}",))
        if ukey in keywords:
            return Reply(501, "5.5.4", (f"Duplicate parameter: {key[:40]}",))
        keywords[ukey] = value if eq else None
    utf8 = utf8_declared or "SMTPUTF8" in keywords
    problem = _check_params(keywords, utf8=utf8)
    if problem is not None:
        return problem
    # A source route (@a,@b:user@dom) is accepted and ignored (RFC 5321 §4.1.2, C).
    if path.startswith("@") and ":" in path:
        path = path.split(":", 1)[1]
    if path == "":
        if keyword == "TO":
            return Reply(501, "5.1.3", ("Bad recipient address syntax",))
        return PathArg("", params, keywords)
    if not path.isascii() and not utf8:
        return Reply(553, "5.6.7", ("Must declare SMTPUTF8 to send UTF8 address",))
    if "@" not in path:
        # A bare local part: only <postmaster> is meaningful as a recipient
        # (RFC 5321 §4.5.1); a sender is left to the MTA, which appends its domain.
        if keyword == "TO" and ascii_lower(path) != "postmaster":
            return Reply(501, "5.1.3", ("Bad recipient address syntax",))
        if not (_DOT_ATOM.match(path) or _QUOTED.match(path)):
            return _bad(keyword)
        return PathArg(path, params, keywords)
    if not valid_mailbox(path, utf8=utf8):
        return _bad(keyword)
    return PathArg(path, params, keywords)


def _bad(keyword: str) -> Reply:
    which = "sender" if keyword == "FROM" else "recipient"
    return Reply(501, "5.1.7" if keyword == "FROM" else "5.1.3", (f"Bad {which} address syntax",))


def _check_params(keywords: dict[str, str | None], *, utf8: bool) -> Reply | None:
    """Every value as its RFC spells it, compared as ASCII.

    Python's Unicode case mapping and digits would take "8b\u0131tmime" for
    8BITMIME (dotless i upper-cases to I), "\u017fuccess" for SUCCESS (long s) and
    "\u0661\u0662" for 12; such values are syntax errors here, as in Postfix,
    rather than parameters passed upstream that the upstream connection cannot
    even encode. Only an ORCPT of type utf-8 (RFC 6533), after SMTPUTF8, may hold
    more than ASCII.
    """
    for key, value in keywords.items():
        if key == "ORCPT":
            if not _orcpt_ok(value or "", utf8=utf8):
                return Reply(501, "5.5.4", ("Bad ORCPT parameter",))
            continue
        if value is not None and not value.isascii():
            return Reply(501, "5.5.4", (f"Bad {key} parameter",))
        if key == "SIZE" and (value is None or not _SIZE.match(value)):
            return Reply(501, "5.5.4", ("Bad SIZE parameter",))
        if key == "BODY" and (value or "").upper() not in ("7BIT", "8BITMIME"):
            return Reply(501, "5.5.4", ("Unsupported BODY type",))
        if key == "SMTPUTF8" and value is not None:
            return Reply(501, "5.5.4", ("SMTPUTF8 takes no value",))
        if key == "RET" and (value or "").upper() not in ("FULL", "HDRS"):
            return Reply(501, "5.5.4", ("Bad RET parameter",))
        if key == "ENVID" and (not value or len(value) > 100 or not xtext.is_valid(value)):
            return Reply(501, "5.5.4", ("Bad ENVID parameter",))
        if key == "NOTIFY":
            items = {v.upper() for v in (value or "").split(",")}
            if not (items == {"NEVER"} or (items and items <= _NOTIFY)):
                return Reply(501, "5.5.4", ("Bad NOTIFY parameter",))
    return None


def _orcpt_ok(value: str, *, utf8: bool) -> bool:
    """`addr-type ";" xtext` (RFC 3461 §4.2); with SMTPUTF8, type utf-8 may carry
    UTF-8 (RFC 6533 §3, utf-8-addr-unitext); any other type is xtext, ASCII."""
    kind, semi, addr = value.partition(";")
    if not semi or not addr or len(value) > 500 or not _ADDR_TYPE.match(kind):
        return False
    if kind.lower() == "utf-8" and utf8:
        return True
    return addr.isascii() and xtext.is_valid(addr)


_HELO = re.compile(r"^[\x21-\x7e]{1,255}$")


def parse_helo(arg: str | None, verb: str) -> str | Reply:
    """One word of printable ASCII: anything else cannot be passed on safely."""
    if not arg:
        return Reply(501, "5.5.4", (f"Syntax: {verb} hostname",))
    if " " in arg or "\t" in arg or not _HELO.match(arg):
        return Reply(501, "5.5.4", (f"Syntax: {verb} hostname",))
    return arg
