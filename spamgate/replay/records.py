"""Reading capture files: every record checked before it is used, every problem named.

A capture may come from another site, be cut short by a full disk or a crash,
or come from a newer spamgate. Each is a clear `file:line: problem`, never a
traceback: a line that is not JSON, a record cut short (the file ends in the
middle of it), a compressed file whose data ends early or is damaged, a record
of a newer format, a field of the wrong shape (named by its path in the record,
`rcpt[1].reply`).

Nothing read here is ever run or opened: records are JSON (no pickle, no eval),
the results kept in them are rebuilt only as types of spamgate's own checks
(`results`), and a path inside a record is only ever text.

Format: docs/capture.md. A directory stands for the capture files in it
(`capture-*.jsonl`, `capture-*.jsonl.gz`), oldest first.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import ipaddress
import json
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..capture import FORMAT
from ..capture.writer import NAME
from ..model import IPAddress, Stage
from ..pipeline.limits import CONTENT_REPLIES
from ..pipeline.verdict import Action

MAX_LINE = 16 * 1024 * 1024  # bytes of one record at most (a stored message is bounded)
_STAGES = frozenset(s.value for s in Stage)
_ACTIONS = frozenset(a.value for a in Action)
_BY = frozenset({None, "us", "upstream", "link"})
_DNS_STATUS = frozenset({"answer", "nxdomain", "nodata", "timeout", "error"})
_CONTENT = frozenset(CONTENT_REPLIES)


class Problem(ValueError):
    """What is wrong with a record, and where in it."""


@dataclass(frozen=True, slots=True)
class Item:
    """One line of a capture file: its record, or what is wrong with it."""

    path: str
    line: int
    record: dict[str, Any] | None
    error: str | None = None
    # The record's client address, parsed once: the check needs it, the replay too.
    address: IPAddress | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def capture_files(paths: Iterable[str]) -> list[str]:
    """The files to read: each file named, and a directory's capture files in order."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if NAME.match(n))
            out += [os.path.join(path, n) for n in names]
        else:
            out.append(path)
    return out


def read(paths: Iterable[str]) -> Iterator[Item]:
    """Every record of every file, in order; a bad line is an Item with `error`
    (the reader goes on with the next line, or the next file)."""
    for path in capture_files(paths):
        yield from _read_file(path)


def _open(path: str):
    with open(path, "rb") as probe:
        magic = probe.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_file(path: str) -> Iterator[Item]:
    line = 0
    try:
        fh = _open(path)
    except OSError as exc:
        yield Item(path, 0, None, f"{path}: {exc.strerror or exc}")
        return
    with fh:
        try:
            while True:
                raw = fh.readline(MAX_LINE)
                if not raw:
                    return
                line += 1
                if not raw.endswith(b"\n"):
                    if len(raw) >= MAX_LINE:
                        _skip_rest(fh)
                        yield _bad(path, line, f"a record longer than {MAX_LINE} bytes")
                        continue
                    yield _bad(path, line, "the record is cut short (the file ends inside it)")
                    return
                yield _parse(path, line, raw)
        except (OSError, EOFError, zlib.error) as exc:
            what = "compressed data is truncated or damaged" if _is_gzip(exc) else str(exc)
            yield Item(path, line + 1, None, f"{path}:{line + 1}: {what} (after record {line})")


def _is_gzip(exc: BaseException) -> bool:
    return isinstance(exc, EOFError | zlib.error | gzip.BadGzipFile)


def _skip_rest(fh) -> None:
    while True:
        chunk = fh.readline(MAX_LINE)
        if not chunk or chunk.endswith(b"\n"):
            return


def _bad(path: str, line: int, problem: str) -> Item:
    return Item(path, line, None, f"{path}:{line}: {problem}")


def _parse(path: str, line: int, raw: bytes) -> Item:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        return _bad(path, line, f"not a JSON record ({detail})")
    try:
        address = check(record)
    except Problem as exc:
        return _bad(path, line, str(exc))
    return Item(path, line, record, address=address)


# -- the shape of a record -------------------------------------------------------------


def check(rec: Any) -> IPAddress:
    """Raise Problem for a record this spamgate cannot read or replay; its client's
    address, parsed."""
    if not isinstance(rec, dict) or "v" not in rec:
        raise Problem('not a spamgate capture record (no format version "v")')
    v = rec["v"]
    if not _int(v) or v < 1:
        raise Problem(f'"v": {v!r} is not a capture format')
    if v > FORMAT:
        raise Problem(
            f"capture format {v} is newer than this spamgate reads (format {FORMAT}): "
            "use a spamgate at least as new as the one that wrote it"
        )
    _number(rec, "t")
    _str(rec, "sid")
    _str(rec, "cfg", optional=True)
    n = rec.get("n")
    if not _int(n) or n < 0:
        raise Problem('"n" is not a transaction number')
    address = _client(_dict(rec, "client"))
    _reply(rec, "connect", "connect", optional=True)
    mail = rec.get("mail")
    if mail is not None:
        _envelope(rec, mail)
    data = rec.get("data")
    if data is not None:
        _dict(rec, "data")
        _reply(data, "reply", "data.reply", optional=True)
        _by(data, "data")
    message = rec.get("message")
    if message is not None:
        _message(_dict(rec, "message"))
    refused = rec.get("content_refused")
    if refused is not None and refused not in _CONTENT:
        raise Problem(f'"content_refused": {refused!r} is not one of {", ".join(sorted(_CONTENT))}')
    end = _dict(rec, "end")
    _str(end, "outcome", "end.outcome")
    _number(end, "score", "end.score")
    _reply(end, "reply", "end.reply", optional=True)
    _by(end, "end")
    for i, v_ in enumerate(_list(rec, "verdicts")):
        _verdict(v_, f"verdicts[{i}]")
    for i, d in enumerate(_list(rec, "dns")):
        _dns(d, f"dns[{i}]")
    for i, s in enumerate(_list(rec, "state")):
        _state(s, f"state[{i}]")
    failures = rec.get("failures", [])
    if not isinstance(failures, list) or not all(_strs(f, 2) for f in failures):
        raise Problem('"failures" is not a list of [check, kind]')
    return address


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _dict(d: dict, key: str, path: str | None = None) -> dict:
    v = d.get(key)
    if not isinstance(v, dict):
        raise Problem(f'"{path or key}" is missing or not an object')
    return v


def _list(d: dict, key: str, path: str | None = None) -> list:
    v = d.get(key)
    if not isinstance(v, list):
        raise Problem(f'"{path or key}" is missing or not a list')
    return v


def _str(d: dict, key: str, path: str | None = None, *, optional: bool = False) -> None:
    v = d.get(key)
    if (v is None and optional) or isinstance(v, str):
        return
    raise Problem(f'"{path or key}" is missing or not text')


def _number(d: dict, key: str, path: str | None = None) -> None:
    v = d.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise Problem(f'"{path or key}" is missing or not a number')


def _strs(v: Any, n: int | None = None) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v) and (n is None or len(v) == n)


def is_reply(r: Any) -> bool:
    return (
        isinstance(r, list)
        and len(r) == 3
        and _int(r[0])
        and 200 <= r[0] <= 599
        and (r[1] is None or isinstance(r[1], str))
        and _strs(r[2])
    )


def _reply(d: dict, key: str, path: str, *, optional: bool = False) -> None:
    r = d.get(key)
    if r is None and optional:
        return
    if not is_reply(r):
        raise Problem(f'"{path}" is not a reply ([code, enhanced, [lines]])')


def _by(d: dict, path: str) -> None:
    if d.get("by") not in _BY:
        raise Problem(f'"{path}.by" is not one of us, upstream, link')


def _client(c: dict) -> IPAddress:
    address = c.get("address")
    try:
        parsed = ipaddress.ip_address(address)  # type: ignore[arg-type]
    except ValueError:
        raise Problem(f'"client.address": {address!r} is not an IP address') from None
    port = c.get("port")
    if not _int(port) or not 0 <= port <= 65535:
        raise Problem('"client.port" is not a port number')
    _str(c, "name", "client.name")
    for i, h in enumerate(_list(c, "helo", "client.helo")):
        if not (
            isinstance(h, list)
            and len(h) == 3
            and isinstance(h[0], str)
            and isinstance(h[1], bool)
            and (h[2] is None or is_reply(h[2]))
        ):
            raise Problem(f'"client.helo[{i}]" is not [name, esmtp, reply]')
    tls = c.get("tls")
    if tls is not None and not (
        isinstance(tls, dict)
        and isinstance(tls.get("version"), str)
        and isinstance(tls.get("cipher"), str)
        and (tls.get("bits") is None or _int(tls.get("bits")))
    ):
        raise Problem('"client.tls" is not {version, cipher, bits}')
    _str(c, "login", "client.login", optional=True)
    _str(c, "local", "client.local", optional=True)
    if not isinstance(c.get("pregreet", False), bool):
        raise Problem('"client.pregreet" is not true or false')
    return parsed


def _envelope(rec: dict, mail: Any) -> None:
    if not isinstance(mail, dict):
        raise Problem('"mail" is not an object')
    _str(mail, "from", "mail.from")
    if not _strs(mail.get("params")):
        raise Problem('"mail.params" is not a list of text')
    keywords = mail.get("keywords")
    if not isinstance(keywords, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in keywords.items()
    ):
        raise Problem('"mail.keywords" is not an object of text')
    size = keywords.get("SIZE")
    if size is not None and not (size.isdigit() and len(size) < 20):
        raise Problem('"mail.keywords.SIZE" is not a number')
    _reply(mail, "reply", "mail.reply", optional=True)
    _by(mail, "mail")
    for i, r in enumerate(_list(rec, "rcpt")):
        if not isinstance(r, dict):
            raise Problem(f'"rcpt[{i}]" is not an object')
        _str(r, "to", f"rcpt[{i}].to")
        if not _strs(r.get("params")):
            raise Problem(f'"rcpt[{i}].params" is not a list of text')
        _reply(r, "reply", f"rcpt[{i}].reply", optional=True)
        _by(r, f"rcpt[{i}]")


def _message(m: dict) -> None:
    size = m.get("size")
    if not _int(size) or size < 0:
        raise Problem('"message.size" is not a size')
    _str(m, "headers", "message.headers")
    _str(m, "sha256", "message.sha256", optional=True)
    if m.get("encoding") not in (None, "latin-1"):
        raise Problem('"message.encoding" is not latin-1')
    if m.get("encoding") is None:
        try:
            m["headers"].encode("utf-8")
        except UnicodeEncodeError:
            raise Problem('"message.headers" is not UTF-8 text') from None
    elif any(ord(ch) > 255 for ch in m["headers"]):
        raise Problem('"message.headers" is not Latin-1 text')
    if not isinstance(m.get("headers_cut", False), bool):
        raise Problem('"message.headers_cut" is not true or false')
    body = m.get("body")
    if body is not None:
        if not isinstance(body, str):
            raise Problem('"message.body" is not base64 text')
        try:
            base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise Problem('"message.body" is not base64') from None


def _verdict(v: Any, path: str) -> None:
    if not isinstance(v, dict):
        raise Problem(f'"{path}" is not an object')
    if v.get("stage") not in _STAGES:
        raise Problem(f'"{path}.stage" is not a stage')
    if not isinstance(v.get("entry"), str):
        raise Problem(f'"{path}.entry" is missing or not text')
    if v.get("action") not in _ACTIONS:
        raise Problem(f'"{path}.action" is not an action')
    if len(v) == 3:  # stage, entry, action: no more to look at (most verdicts)
        return
    for key in ("rule", "warn"):
        if key in v and not isinstance(v[key], str):
            raise Problem(f'"{path}.{key}" is not text')
    if "reply" in v and not is_reply(v["reply"]):
        raise Problem(f'"{path}.reply" is not a reply ([code, enhanced, [lines]])')
    if "symbols" in v and not _pairs(v["symbols"], str, _score):
        raise Problem(f'"{path}.symbols" is not a list of [name, score]')
    if "headers" in v and not _pairs(v["headers"], str, str):
        raise Problem(f'"{path}.headers" is not a list of [name, value]')
    if "hits" in v and not _pairs(v["hits"], str, _int):
        raise Problem(f'"{path}.hits" is not a list of [table, line]')
    if "counted" in v and not _pairs(v["counted"], str, _strs):
        raise Problem(f'"{path}.counted" is not a list of [series, [labels]]')
    would = v.get("would", [])
    if not isinstance(would, list) or not all(
        isinstance(w, dict)
        and w.get("action") in _ACTIONS
        and (w.get("rule") is None or isinstance(w.get("rule"), str))
        and (w.get("reply") is None or is_reply(w.get("reply")))
        for w in would
    ):
        raise Problem(f'"{path}.would" is not a list of {{action, rule, reply}}')
    if not isinstance(v.get("monitor", False), bool):
        raise Problem(f'"{path}.monitor" is not true or false')


def _score(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _pairs(items: Any, first: Any, second: Any) -> bool:
    """A list of [a, b] whose a and b pass their tests (a type, or a function)."""

    def ok(test: Any, x: Any) -> bool:
        return isinstance(x, test) if isinstance(test, type) else test(x)

    return isinstance(items, list) and all(
        isinstance(p, list) and len(p) == 2 and ok(first, p[0]) and ok(second, p[1]) for p in items
    )


def _dns(d: Any, path: str) -> None:
    if not (
        isinstance(d, list)
        and len(d) == 5
        and isinstance(d[0], str)
        and isinstance(d[1], str)
        and d[2] in _DNS_STATUS
        and (d[3] is None or _int(d[3]))
    ):
        raise Problem(f'"{path}" is not [name, type, status, ttl, data]')
    if d[2] in ("timeout", "error"):
        if not isinstance(d[4], str):
            raise Problem(f'"{path}": a failed lookup\'s data is its error text')
    elif d[2] == "answer" and not isinstance(d[4], list):
        raise Problem(f'"{path}": an answer\'s data is a list of records')


def _window(w: Any) -> bool:
    return (
        isinstance(w, list)
        and len(w) == 4
        and isinstance(w[0], str)
        and isinstance(w[1], int | float)
        and (w[2] is None or _int(w[2]))
        and _int(w[3])
    )


def _state(s: Any, path: str) -> None:
    if not isinstance(s, dict):
        raise Problem(f'"{path}" is not an object')
    op = s.get("op")
    unavailable = s.get("unavailable", False) is True
    if op == "hit":
        ws = s.get("windows")
        if not isinstance(ws, list) or not ws or not all(_window(w) for w in ws):
            raise Problem(f'"{path}.windows" is not a list of [key, seconds, limit, cost]')
        if not unavailable:
            counts = s.get("counts")
            exceeded = s.get("exceeded")
            if not (
                isinstance(counts, list)
                and len(counts) == len(ws)
                and all(_int(c) for c in counts)
                and (exceeded is None or (_int(exceeded) and 0 <= exceeded < len(ws)))
            ):
                raise Problem(f'"{path}": counts and exceeded do not fit its windows')
    elif op == "first_seen":
        _str(s, "key", f"{path}.key")
        if not unavailable:
            _number(s, "age", f"{path}.age")
    elif op == "marked":
        keys = s.get("keys")
        if not _strs(keys):
            raise Problem(f'"{path}.keys" is not a list of text')
        if not unavailable:
            found = s.get("found")
            if not (
                isinstance(found, list)
                and len(found) == len(keys)  # type: ignore[arg-type]
                and all(isinstance(f, bool) for f in found)
            ):
                raise Problem(f'"{path}.found" does not fit its keys')
    else:
        raise Problem(f'"{path}.op" is not hit, first_seen or marked')
