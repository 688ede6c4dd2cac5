"""A finished transaction as a capture record: plain JSON values (docs/capture.md).

Runs after the transaction has ended, never while a session waits: the session
hands over references to what it saw (verdicts, replies and DNS answers are
immutable values; the client's facts were copied when MAIL came), and everything
that costs (the record's shape, the keyed hashes, the message's digest, JSON) is
done here, in batches (`recorder.Capture`).

Format 1, one JSON object per line; every field is described in docs/capture.md.
Nothing in a record is code or a reference to code: results are written as their
fields and the name of their type, read back only into types a replay knows
(`replay.records`), never through pickle or eval.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from typing import Any

import dns.name

from ..domains import ascii_lower
from ..model import Stage
from ..pipeline.verdict import Action, Verdict
from ..reply import Reply
from ..resolver import DnsAnswer, DnsError
from ..state import Hit, Window

FORMAT = 1  # the record format this spamgate writes (and the newest it reads)

_EOD = Stage.EOD
# An enum member's `.value` is a property; these are dict lookups (a record has many).
_STAGES = {s: s.value for s in Stage}
_ACTIONS = {a: a.value for a in Action}


def reply(r: Reply | None) -> list | None:
    """[code, enhanced status or null, [text lines]]."""
    if r is None:
        return None
    return [r.code, r.enhanced, list(r.lines)]


def name_text(name: str | dns.name.Name) -> str:
    """A DNS name as the recording keys it: lower case, no final dot."""
    if isinstance(name, dns.name.Name):
        name = name.to_text(omit_final_dot=True)
    if name.isascii():  # (almost always): str.lower is ASCII's own there
        return name.lower().rstrip(".")
    return ascii_lower(name).rstrip(".")


# -- results -----------------------------------------------------------------------------


def counted(result: object) -> list | None:
    """The metric series a finding names (`counted()`), as [series, [labels]]."""
    method = getattr(result, "counted", None)
    if method is None:
        return None
    out = []
    for item in method():
        out.append([item[0], [str(x) for x in item[1]]])
    return out


def value(v: Any) -> Any:
    """A result as JSON: a dataclass as its fields plus "@type" (its class name),
    tuples as lists, sets as sorted lists, enums as their value, the rest as text."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        out: dict[str, Any] = {"@type": type(v).__name__}
        for f in dataclasses.fields(v):
            out[f.name] = value(getattr(v, f.name))
        return out
    if isinstance(v, tuple | list):
        return [value(x) for x in v]
    if isinstance(v, frozenset | set):
        return {"@set": sorted((value(x) for x in v), key=str)}
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, bytes):
        return {"@bytes": base64.b64encode(v).decode("ascii")}
    return str(v)


def verdict(stage: Stage, label: str, v: Verdict) -> dict[str, Any]:
    """One entry's verdict. Its typed result is kept at end of data only, where a
    replay without the message may have to give the recorded verdict back (a
    check that needs the body; a scanner daemon); elsewhere the checks run again."""
    out: dict[str, Any] = {"stage": _STAGES[stage], "entry": label, "action": _ACTIONS[v.action]}
    if v.rule:
        out["rule"] = v.rule
    if v.reply is not None:
        out["reply"] = reply(v.reply)
    if v.symbols:
        out["symbols"] = [[s.name, s.score] for s in v.symbols]
    if v.headers:
        out["headers"] = [list(h) for h in v.headers]
    if v.warn:
        out["warn"] = v.warn
    if v.monitor:
        out["monitor"] = True
    if v.would:
        out["would"] = [
            {"action": w.action.value, "rule": w.rule, "reply": reply(w.reply)} for w in v.would
        ]
    if v.hits:
        out["hits"] = [[t, n] for t, n in v.hits]
    if v.result is not None:
        series = counted(v.result)
        if series is not None:  # a finding; others are working state (a parsed view)
            if series:
                out["counted"] = series
            if stage is _EOD:
                out["result"] = value(v.result)
    return out


def dns_entries(
    items: Iterable[tuple[str | dns.name.Name, str, DnsAnswer | DnsError]], now: float
) -> list[list]:
    """[name, type, status, ttl, data], one per (name, type), the last answer given:
    status answer (data: the records), nxdomain, nodata, timeout or error (data:
    what went wrong). TTL in seconds left when the check received it; null unknown."""
    seen: dict[tuple[str, str], list] = {}
    for name, rdtype, answer in items:
        key = (name_text(name), rdtype)
        if isinstance(answer, DnsError):
            seen[key] = [key[0], rdtype, answer.kind, None, answer.detail]
            continue
        ttl = max(0, round(answer.expires - now)) if answer.expires else None
        data = records(answer) if answer.status == "answer" else None
        seen[key] = [key[0], rdtype, answer.status, ttl, data]
    return list(seen.values())


def records(answer: DnsAnswer) -> list:
    """The records in the simplest faithful form: addresses, TXT strings (bytes as
    Latin-1, so every byte survives), [preference, exchange], target names; other
    types in presentation format."""
    t = answer.rdtype
    if t in ("A", "AAAA"):
        return [r.address for r in answer.records]
    if t in ("TXT", "SPF"):
        return [[s.decode("latin-1") for s in r.strings] for r in answer.records]
    if t == "MX":
        return [[r.preference, r.exchange.to_text(omit_final_dot=True)] for r in answer.records]
    if t in ("PTR", "CNAME", "NS"):
        return [r.target.to_text(omit_final_dot=True) for r in answer.records]
    return [r.to_text() for r in answer.records]


def windows(ws: Sequence[Window], key) -> list[list]:
    return [[key(w.key), w.seconds, w.limit, w.cost] for w in ws]


def state_entries(items: Sequence[tuple], key) -> list[dict[str, Any]]:
    """The state store's answers, in the order given; "unavailable": it could not."""
    out: list[dict[str, Any]] = []
    for item in items:
        op = item[0]
        if op == "hit":
            hit: Hit | None = item[2]
            entry: dict[str, Any] = {"op": "hit", "windows": windows(item[1], key)}
            if hit is None:
                entry["unavailable"] = True
            else:
                entry["exceeded"] = hit.exceeded
                entry["counts"] = list(hit.counts)
        elif op == "first_seen":
            entry = {"op": "first_seen", "key": key(item[1]), "ttl": item[2]}
            if item[3] is None:
                entry["unavailable"] = True
            else:
                entry["age"] = item[3]
        else:  # marked
            entry = {"op": "marked", "keys": [key(k) for k in item[1]]}
            if item[2] is None:
                entry["unavailable"] = True
            else:
                entry["found"] = list(item[2])
        out.append(entry)
    return out


# -- redaction ---------------------------------------------------------------------------

# A local part in an addr-spec (RFC 5322 §3.4.1, dot-atom or quoted), before "@domain".
_ADDRESS = re.compile(r"""(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+|"[^"\r\n]*")@(?=[A-Za-z0-9\[])""")
# A local part inside a state store key (greylist triplets, rate limits per recipient).
_KEY_LOCAL = re.compile(r"[^\s/:<>@]+@")


def key_shape(key: str) -> str:
    """A state key with every local part as "*": what a redacted capture keeps, and
    what a replay of one compares (the key is made from addresses it only has
    as hashes)."""
    return _KEY_LOCAL.sub("*@", key)


class Redactor:
    """Keyed hashes in place of local parts (HMAC-SHA-256, 16 hex digits): the same
    address gives the same hash in every record made with the same key, so a
    report still counts distinct senders; without the key nobody can test a
    guessed address against it."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _hash(self, text: str) -> str:
        digest = hmac.new(self._key, text.encode("utf-8", "surrogateescape"), hashlib.sha256)
        return "h" + digest.hexdigest()[:16]

    def address(self, address: str) -> str:
        local, at, domain = address.rpartition("@")
        if not at:
            return address if address.lower() in ("", "postmaster") else self._hash(address)
        return f"{self._hash(local)}@{domain}"

    def text(self, text: str) -> str:
        return _ADDRESS.sub(lambda m: self._hash(m.group(0)[:-1]) + "@", text)

    def login(self, login: str) -> str:
        return self._hash(login)


def as_text(data: bytes) -> tuple[str, str | None]:
    """Message bytes as a JSON string and how to get the bytes back: UTF-8 when
    they are (None), else Latin-1, which keeps every byte ("latin-1")."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"
