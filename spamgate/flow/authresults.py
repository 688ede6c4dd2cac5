"""The Authentication-Results header field (RFC 8601): what spamgate found, for the
mail stores downstream, which read this header already.

It is built by the session driver (`headers.py`) for every message relayed or held, in
monitor mode too (a header refuses nothing), from the typed results the checks
recorded: SPF for MAIL FROM and for HELO, each DKIM signature, DMARC per author
domain. A method that did not run (disabled, or skipped for a client in
mynetworks) is not reported: "spf=none" would claim that SPF was evaluated and
found no record. With nothing to report the header says "none" (RFC 8601 §2.2).
The `authres` package renders each result (its quoting of values); spamgate puts
each on its own folded line.

The authserv-id is `[server] hostname`. A header field that claims it, arriving
with the message, is a forgery or a loop: RFC 8601 §5 says to remove it, and the
core does, using `claims()` (the comparison ignores case, as for domains).
"""

from __future__ import annotations

import contextlib
import email.header
import functools
import re
import unicodedata

import authres
import authres.dmarc

from ..checks.dkim import DkimResults
from ..checks.dmarc import DmarcResults
from ..checks.spf import SpfHeloResult, SpfResult
from ..model import Session, Transaction

NAME = "Authentication-Results"

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_ADDRESS = re.compile(rf"(?:{_DOT_ATOM})?@{_DOT_ATOM}")
_UNSAFE_COMMENT = re.compile(r"[^\x20-\x27\x2a-\x5b\x5d-\x7e]")  # no ( ) \ or controls


def build(authserv_id: str, session: Session, txn: Transaction | None) -> str:
    """The header field's value, folded: the authserv-id, then one result a line."""
    lines: list[str] = []
    results: list[authres.core.BaseAuthenticationResult] = []
    found = txn.results if txn is not None else None
    spf = found.get(SpfResult) if found is not None else None
    if spf is not None:
        lines.append(_spf_line(spf.result, spf.detail, "mailfrom", spf.sender))
    helo = session.results.get(SpfHeloResult)
    if helo is not None:
        lines.append(_spf_line(helo.result, helo.detail, "helo", helo.helo))
    dkim = found.get(DkimResults) if found is not None else None
    if dkim is not None and not dkim.signatures:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    for sig in dkim.signatures if dkim is not None else ():
        props = [
            ("d", _plain(sig.domain)),
            ("i", _address(sig.identity)),
            ("s", _plain(sig.selector)),
            ("a", _plain(sig.algorithm)),
            ("b", _plain(sig.b)),  # RFC 6008: tells apart two signatures of one domain
        ]
        results.append(
            authres.DKIMAuthenticationResult(
                result=sig.result,
                result_comment=_comment(sig.reason),
                properties=[
                    authres.core.AuthenticationResultProperty("header", name, value)
                    for name, value in props
                    if value
                ],
            )
        )
    dmarc = found.get(DmarcResults) if found is not None else None
    if dmarc is not None and dmarc.problem:
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result="permerror", result_comment=_comment(dmarc.problem)
            )
        )
    for r in dmarc.results if dmarc is not None else ():
        comment = f"p={r.policy} dis={r.disposition}" if r.policy else ""
        if r.reason:
            comment = f"{comment}; {r.reason}" if comment else r.reason
        results.append(
            authres.dmarc.DMARCAuthenticationResult(
                result=r.result, result_comment=_comment(comment), header_from=r.domain
            )
        )
    lines += (_fold(str(r)) for r in results)
    if not lines:
        return f"{authserv_id}; none"
    return authserv_id + "".join(f";\r\n\t{line}" for line in lines)


@functools.lru_cache(maxsize=4096)
def _spf_line(result: str, detail: str, kind: str, identity: str) -> str:
    """An SPF result rendered and folded. The same few (result, sender or HELO name)
    come back message after message, and authres renders each through several
    objects: kept, bounded, as the text it always gives."""
    if kind == "mailfrom":
        spf = authres.SPFAuthenticationResult(
            result=result, result_comment=_comment(detail), smtp_mailfrom=_address(identity)
        )
    else:
        spf = authres.SPFAuthenticationResult(
            result=result, result_comment=_comment(detail), smtp_helo=_plain(identity)
        )
    return _fold(str(spf))


def _fold(text: str, width: int = 76) -> str:
    """A long result folded at spaces (RFC 5322 §2.2.3): CRLF goes before a space,
    which stays, so unfolding gives back the text exactly, quoted strings and
    comments included. Every value is bounded, so no line nears 998 bytes."""
    words = text.split(" ")
    lines = [words[0]]
    for word in words[1:]:
        if len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] += " " + word
    return "\r\n ".join(lines)


def claims(value: str, authserv_id: str) -> bool:
    """Whether any reader downstream could take an Authentication-Results value for
    one that `authserv_id` wrote.

    Not only the RFC 8601 reading counts: the field is removed if any of the ways
    other software reads a value names us (found by probing). A domain comparison ignores
    a root dot ("gate.test."); Postfix cuts a field at a NUL and C parsers stop a
    token at any character a token cannot hold, so the id is also read up to the
    first one ("gate.test\\0...", "gate.test/x"); a pipeline may strip control
    characters first (Postfix's message_strip_characters); Python's email package
    decodes RFC 2047 encoded-words in any field it does not know; Unicode-aware
    readers fold case and compatibility forms. Removing a field that was not ours
    costs nothing (it was malformed or lying); keeping one that reads as ours
    would hand the reader a "pass" of the sender's making.
    """
    ours = _comparable(authserv_id)
    return any(_comparable(found) == ours for found in _readings(value))


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TOKEN_HEAD = re.compile(r"[\w.-]*")  # letters, digits, "_", ".", "-": any script


def _readings(value: str) -> set[str]:
    """The authserv-ids that readers of `value` may find (see `claims`)."""
    values = {value, _CONTROLS.sub("", value)}
    if "=?" in value:
        with contextlib.suppress(Exception):  # the email package's own errors
            header = email.header.make_header(email.header.decode_header(value))
            values.add(str(header))
    found: set[str] = set()
    for text in values:
        whole = authserv_id_of(text)
        if whole:
            found |= {whole, _TOKEN_HEAD.match(whole).group(0)}  # type: ignore[union-attr]
    return found


def _comparable(name: str) -> str:
    return unicodedata.normalize("NFKC", name).casefold().strip().rstrip(".")


def authserv_id_of(value: str) -> str | None:
    """The authserv-id of an Authentication-Results value: its first token after any
    comments (RFC 8601 §2.2: a "value", token or quoted-string)."""
    text = _skip_cfws(value)
    if text.startswith('"'):
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text, re.S)
        return re.sub(r"\\(.)", r"\1", match.group(1)) if match else None
    match = re.match(r"[^\s;()\"]+", text)
    return match.group(0) if match else None


def _skip_cfws(text: str) -> str:
    """`text` without leading folding white space and (nested) comments."""
    i, depth = 0, 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif not c.isspace():
            break
        i += 1
    return text[i:]


def _plain(value: str) -> str | None:
    """A property value that is not an address: printable ASCII, bounded, and
    without "@" (which authres would not quote); None if nothing is left."""
    value = re.sub(r"[^\x21-\x7e]", "?", value)[:255]
    return None if not value or "@" in value else value


def _address(value: str) -> str | None:
    """A property value that is an address: as it is if it reads safely as one
    (local@domain, @domain), else only @domain, so that no sender-chosen local
    part can break the header's syntax or pose as another result."""
    if not value or len(value) > 320:
        return None
    if _ADDRESS.fullmatch(value):
        return value
    domain = value.rpartition("@")[2]
    return f"@{domain}" if re.fullmatch(_DOT_ATOM, domain) else None


def _comment(text: str) -> str | None:
    """Free text as a comment: no parentheses, backslashes or controls; bounded."""
    text = _UNSAFE_COMMENT.sub(" ", text).strip()
    return text[:200] or None
