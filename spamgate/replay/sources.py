"""What a replayed session asks, answered from its record: DNS, the state store, the
upstream.

The record being replayed is `PLAYING.now`: a replay runs one record at a time,
and a plain holder (not a context variable) is what every check, concurrent or in
pyspf's run, finds it in, without a copy of it in every timer a check sets (a
cancelled timer would keep the record alive). A question the record holds
the answer to gets that answer, as the check received it then (records, NXDOMAIN,
no data, a time-out; the store's counts and ages; the upstream's reply). A
question it does not hold (a DNS list zone added since, a state key a changed
rule makes) is written down as unknown and answered as a failure (DNS) or as
"nothing known" (the store), unless `--live-dns` gave a resolver to ask instead.

Rate counts are played, not merely repeated: a record keeps each window's count
as the store gave it, so a replay knows how much of it came from other sessions
and how much from this transaction's own earlier requests; a candidate that
refuses one of those requests counts less for the next, as the store would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from ..capture.encode import key_shape, name_text
from ..message import Outgoing
from ..model import Client
from ..reply import Reply
from ..resolver import DnsAnswer, DnsError, Resolver
from ..state import Hit, StateStore, StoreUnavailable, Window
from ..upstream.base import Upstream, UpstreamError, UpstreamSession

if TYPE_CHECKING:
    from ..model import IPAddress

_IN = dns.rdataclass.IN
NOT_ASKED = "(not relayed when recorded: the replay assumes the upstream took it)"


class ReplayError(ValueError):
    """A record whose contents cannot be replayed (a DNS record that does not parse)."""


class Playing:
    """One record as the replay's sources see it, and what the replay asked beyond it."""

    __slots__ = (
        "_ages",
        "_hits",
        "_marks",
        "answers",
        "assumed",
        "broken",
        "dns",
        "live",
        "rcpt_seen",
        "record",
        "redacted",
        "seen",
        "unknown",
    )

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.redacted = bool(record.get("redacted"))
        self.dns = {(d[0], d[1]): d for d in record["dns"]}
        self.answers: dict[tuple[str, str], DnsAnswer] = {}  # built from `dns` when asked
        self.unknown: list[str] = []  # questions the record does not answer
        self.live: list[str] = []  # ... that were asked live instead (--live-dns)
        self.assumed = 0  # upstream replies assumed (commands not relayed when recorded)
        self.broken: str | None = None  # what in the record could not be used
        self.rcpt_seen: dict[str, int] = {}
        self.seen: dict[tuple[str, str], int] = {}  # state key -> calls so far
        self._hits: dict[str, list[int | None]] | None = None
        self._ages: dict[str, list[float | None]] | None = None
        self._marks: dict[str, list[bool | None]] | None = None

    def note_unknown(self, what: str) -> None:
        if what not in self.unknown:
            self.unknown.append(what)

    # -- the state store's answers ---------------------------------------------------------

    def _state(self) -> None:
        """Index the recorded store answers by key (once, when first asked)."""
        hits: dict[str, list[int | None]] = {}
        ages: dict[str, list[float | None]] = {}
        marks: dict[str, list[bool | None]] = {}
        own: dict[str, int] = {}
        for s in self.record["state"]:
            op = s["op"]
            unavailable = s.get("unavailable", False) is True
            if op == "hit":
                exceeded = s.get("exceeded")
                for i, (key, _seconds, _limit, cost) in enumerate(s["windows"]):
                    if unavailable:
                        hits.setdefault(key, []).append(None)
                        continue
                    after = s["counts"][i]
                    before = after - cost if exceeded is None else after
                    # Others' events in the window: the count less this transaction's own.
                    hits.setdefault(key, []).append(before - own.get(key, 0))
                    if exceeded is None:
                        own[key] = own.get(key, 0) + cost
            elif op == "first_seen":
                ages.setdefault(s["key"], []).append(None if unavailable else s["age"])
            else:
                for k, key in enumerate(s["keys"]):
                    found = None if unavailable else s["found"][k]
                    marks.setdefault(key, []).append(found)
        self._hits, self._ages, self._marks = hits, ages, marks

    def _next(self, table: dict[str, list], op: str, key: str) -> tuple[bool, Any]:
        """(known, the answer) for the next call of `op` on `key`: the recorded
        answers in order, the last one again for calls beyond them."""
        if self.redacted:
            key = key_shape(key)
        answers = table.get(key)
        if not answers:
            self.note_unknown(f"state {op} {key}")
            return False, None
        n = self.seen.get((op, key), 0)
        self.seen[(op, key)] = n + 1
        return True, answers[min(n, len(answers) - 1)]

    def others(self, key: str) -> tuple[bool, int | None]:
        if self._hits is None:
            self._state()
        return self._next(self._hits, "hit", key)  # type: ignore[arg-type]

    def age(self, key: str) -> tuple[bool, float | None]:
        if self._ages is None:
            self._state()
        return self._next(self._ages, "first_seen", key)  # type: ignore[arg-type]

    def mark(self, key: str) -> tuple[bool, bool | None]:
        if self._marks is None:
            self._state()
        return self._next(self._marks, "marked", key)  # type: ignore[arg-type]


class Deck:
    """The record being replayed (`now`), one at a time."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now: Playing | None = None

    def get(self) -> Playing:
        now = self.now
        assert now is not None, "no record is being replayed"
        return now


PLAYING = Deck()


# -- DNS ------------------------------------------------------------------------------------


class ReplayResolver(Resolver):
    """DNS answers from the record; `live` (--live-dns) asks what it does not hold."""

    def __init__(self, lifetime: float, live: Resolver | None = None) -> None:
        self.lifetime = lifetime
        self.live = live
        # Answers already built, by their recorded form: records share answers (a
        # sender domain's SPF record, a list's "not listed"), and building one parses.
        self._built: dict[tuple, DnsAnswer] = {}

    def _given(self, playing: Playing, key: tuple[str, str]) -> DnsAnswer | DnsError | None:
        """The record's answer for `key`, built once per record."""
        answer = playing.answers.get(key)
        if answer is None:
            entry = playing.dns.get(key)
            if entry is None:
                return None
            if entry[2] in ("timeout", "error"):
                return DnsError(entry[2], entry[4])
            answer = playing.answers[key] = self._answer(entry)
        return answer

    def cached(self, name: str | dns.name.Name, rdtype: str) -> DnsAnswer | None:
        given = self._given(PLAYING.get(), (name_text(name), rdtype))
        return given if isinstance(given, DnsAnswer) else None

    async def lookup(
        self, name: str | dns.name.Name, rdtype: str, *, timeout: float | None = None
    ) -> DnsAnswer:
        playing = PLAYING.get()
        given = self._given(playing, (name_text(name), rdtype))
        if isinstance(given, DnsError):
            raise given
        if given is not None:
            return given
        what = f"{name_text(name)}/{rdtype}"
        if self.live is not None:
            playing.live.append(what)
            return await self.live.lookup(name, rdtype, timeout=timeout)
        playing.note_unknown(f"DNS {what}")
        raise DnsError("error", f"{what}: not in the capture (replay with --live-dns to ask)")

    def current(self, answers: Sequence[tuple[tuple[str, str], DnsAnswer]], until: float) -> bool:
        """What a check kept holds while the record being replayed gives the same
        answers (the same objects: `_answer` builds one per recorded form)."""
        playing = PLAYING.get()
        return all(self._given(playing, key) is answer for key, answer in answers)

    async def verified_name(self, address: IPAddress) -> str:
        return str(PLAYING.get().record["client"]["name"])

    def _answer(self, entry: list) -> DnsAnswer:
        data = entry[4]
        key = (entry[0], entry[1], entry[2], _frozen(entry[1], data))
        answer = self._built.get(key)
        if answer is None:
            records = _records(entry[1], data) if entry[2] == "answer" else ()
            # No expiry: nothing is remembered across records (SPF's memo keeps
            # only results whose answers have not expired).
            answer = DnsAnswer(entry[0], entry[1], entry[2], records, expires=0.0)
            if len(self._built) > 100_000:
                self._built.clear()
            self._built[key] = answer
        return answer

    async def aclose(self) -> None:
        if self.live is not None:
            await self.live.aclose()


def _frozen(rdtype: str, data: list | None) -> tuple | None:
    """The recorded records as a key: a tuple of their (hashable) forms."""
    if data is None:
        return None
    try:
        key = tuple(map(tuple, data)) if rdtype in ("TXT", "SPF", "MX") else tuple(data)
        hash(key)
    except TypeError:
        raise ReplayError(f"recorded {rdtype} records of the wrong shape") from None
    return key


def _records(rdtype: str, data: list) -> tuple[dns.rdata.Rdata, ...]:
    """Records from their recorded form (capture.encode.records)."""
    try:
        kind = dns.rdatatype.from_text(rdtype)
        cls = dns.rdata.get_rdata_class(_IN, kind)
        out = []
        for item in data:
            if rdtype in ("A", "AAAA"):
                out.append(cls(_IN, kind, item))
            elif rdtype in ("TXT", "SPF"):
                out.append(cls(_IN, kind, [s.encode("latin-1") for s in item]))
            elif rdtype == "MX":
                out.append(cls(_IN, kind, item[0], dns.name.from_text(item[1])))
            elif rdtype in ("PTR", "CNAME", "NS"):
                out.append(cls(_IN, kind, dns.name.from_text(item)))
            else:
                out.append(dns.rdata.from_text(_IN, kind, item))
        return tuple(out)
    except (dns.exception.DNSException, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ReplayError(f"a recorded {rdtype} record that does not parse ({exc})") from None


# -- the state store --------------------------------------------------------------------------


class ReplayStore(StateStore):
    """The state store's answers from the record, counting as the store would."""

    kind = "replay"

    async def hit(self, windows: Sequence[Window]) -> Hit:
        playing = PLAYING.get()
        befores: list[int] = []
        exceeded: int | None = None
        for i, w in enumerate(windows):
            known, others = playing.others(w.key)
            if known and others is None:
                raise StoreUnavailable("unavailable when recorded")
            own = playing.seen.get(("own", w.key), 0)
            before = (others or 0) + own
            befores.append(before)
            if exceeded is None and w.limit is not None and before + w.cost > w.limit:
                exceeded = i
        if exceeded is not None:
            return Hit(exceeded, tuple(befores))
        for w in windows:
            playing.seen[("own", w.key)] = playing.seen.get(("own", w.key), 0) + w.cost
        return Hit(None, tuple(b + w.cost for b, w in zip(befores, windows, strict=True)))

    async def first_seen(self, key: str, ttl: float) -> float:
        known, age = PLAYING.get().age(key)
        if known and age is None:
            raise StoreUnavailable("unavailable when recorded")
        return float(age or 0.0)

    async def marked(self, keys: Sequence[str]) -> tuple[bool, ...]:
        playing = PLAYING.get()
        out = []
        for key in keys:
            known, found = playing.mark(key)
            if known and found is None:
                raise StoreUnavailable("unavailable when recorded")
            out.append(bool(found))
        return tuple(out)

    async def mark(self, key: str, ttl: float) -> None:
        return None

    async def unmark(self, keys: Sequence[str]) -> None:
        return None

    async def ping(self) -> None:
        return None

    def describe(self) -> str:
        return "the answers recorded in the capture"


# -- the upstream ------------------------------------------------------------------------------


def _reply(r: list) -> Reply:
    return Reply(r[0], r[1], tuple(r[2]))


class ReplayUpstream(Upstream, UpstreamSession):
    """The upstream as it answered when recorded; what it was not asked then, it is
    assumed to take (250), and the replay says how often it assumed so."""

    name = "replay"

    async def open(self, client: Client) -> UpstreamSession:
        return self

    @staticmethod
    def _given(part: dict[str, Any] | None, command: str) -> Reply | None:
        if part is None:
            return None
        by = part.get("by")
        if by == "link":
            raise UpstreamError("connect", f"the upstream could not be reached ({command}) then")
        if by == "upstream" and part.get("reply") is not None:
            return _reply(part["reply"])
        return None

    async def mail(self, sender: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        playing = PLAYING.get()
        reply = self._given(playing.record.get("mail"), "MAIL")
        if reply is None:
            playing.assumed += 1
            return Reply(250, "2.1.0", ("Ok",))
        return reply

    async def rcpt(self, recipient: str, params: tuple[str, ...], smtputf8: bool) -> Reply:
        playing = PLAYING.get()
        n = playing.rcpt_seen.get(recipient, 0)
        playing.rcpt_seen[recipient] = n + 1
        same = [r for r in playing.record.get("rcpt", []) if r["to"] == recipient]
        reply = self._given(same[n] if n < len(same) else None, "RCPT")
        if reply is None:
            playing.assumed += 1
            return Reply(250, "2.1.5", ("Ok",))
        return reply

    async def data(self, content: Outgoing) -> Reply:
        playing = PLAYING.get()
        reply = self._given(playing.record.get("end"), "DATA")
        if reply is None:
            playing.assumed += 1
            return Reply(250, "2.0.0", (f"Ok {NOT_ASKED}",))
        return reply

    async def rset(self) -> None:
        return None

    async def close(self) -> None:
        return None

    @property
    def usable(self) -> bool:
        return True
