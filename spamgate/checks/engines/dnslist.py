"""DNS lists (RFC 5782): postscreen's site syntax, query names, reading the answers.

Shared by the client-address lists (`checks/dnsbl.py`) and the domain lists
(`checks/rhsbl.py`). A site is written as Postfix's postscreen_dnsbl_sites are:

    zone[=filter][*weight]      zen.example=127.0.0.[2..11]*3   list.dnswl.example*-5

The filter is four dot-separated parts, each a number or a bracketed list of numbers
and `lo..hi` ranges separated by ";". Without one, any 127.0.0.0/8 answer lists.

What this module gets right, because peers' users were hurt by it: an answer is a
listing only if it is one the site asked for. The codes lists send to say "I refuse
to answer you" (127.255.255.252/254/255: typo in the zone, open resolver, too many
queries; 127.0.1.255 on a domain list: IP query) and answers outside the filter or
outside 127/8 (a resolver that rewrites NXDOMAIN) are errors: counted, logged,
never a reason to refuse mail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from ...model import IPAddress
from ...pipeline.check import Series
from ...pipeline.verdict import Action, Symbol, Verdict
from ...reply import Reply
from ...resolver import DnsAnswer, DnsError, Resolver, ascii_domain, is_domain

# What the lists' own "refused" answers mean (Spamhaus: "must not be used to reject").
ERROR_CODES: dict[str, str] = {
    "127.255.255.252": "typo in the zone name",
    "127.255.255.254": "query through a public or open resolver",
    "127.255.255.255": "too many queries",
    "127.0.1.255": "IP address queried on a domain list",
}
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
# The series a zone's answers are counted in, and its closed set of results.
DNSBL_RESULTS = "spamgate_dnsbl_results_total"
ZONE_RESULTS = ("listed", "not_listed", "error")

_SITE = re.compile(
    r"^(?P<zone>[^=*\s]+)(?:=(?P<filter>[^*\s]+))?(?:\*(?P<weight>[-+]?\d+(?:\.\d+)?))?$"
)
_PART = re.compile(r"^(?:\d{1,3}|\[[0-9;.]+\])$")
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_REASON_MAX = 200  # characters of a TXT reason put in the SMTP reply


@dataclass(frozen=True, slots=True)
class Filter:
    """Allowed values for each of the four octets of an answer."""

    octets: tuple[frozenset[int], frozenset[int], frozenset[int], frozenset[int]]
    text: str

    @classmethod
    def parse(cls, text: str) -> Filter:
        parts = text.split(".") if "[" not in text else _split_outside_brackets(text)
        if len(parts) != 4 or not all(_PART.match(p) for p in parts):
            raise ValueError(f'filter "{text}" is not d.d.d.d (each d a number or [list])')
        return cls(tuple(_octet(p, text) for p in parts), text)  # type: ignore[arg-type]

    def matches(self, address: ipaddress.IPv4Address) -> bool:
        return all(o in allowed for o, allowed in zip(address.packed, self.octets, strict=True))


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "." and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [*parts, current]


def _octet(part: str, text: str) -> frozenset[int]:
    values: set[int] = set()
    items = part[1:-1].split(";") if part.startswith("[") else [part]
    for item in items:
        lo_s, sep, hi_s = item.partition("..")
        if not lo_s.isdigit() or (sep and not hi_s.isdigit()):
            raise ValueError(f'filter "{text}": "{item}" is not a number or a lo..hi range')
        lo, hi = int(lo_s), int(hi_s) if sep else int(lo_s)
        if not 0 <= lo <= hi <= 255:
            raise ValueError(f'filter "{text}": "{item}" is not within 0..255')
        values.update(range(lo, hi + 1))
    return frozenset(values)


@dataclass(frozen=True, slots=True)
class Site:
    """One configured `zone[=filter][*weight]`."""

    zone: str
    filter: Filter | None
    weight: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Site:
        m = _SITE.match(text.strip())
        if not m:
            raise ValueError(f'"{text}" is not zone[=filter][*weight]')
        zone = m.group("zone").lower().rstrip(".")
        if not is_domain(zone):
            raise ValueError(f'"{text}": "{zone}" is not a DNS zone')
        filt = Filter.parse(m.group("filter")) if m.group("filter") else None
        weight = float(m.group("weight")) if m.group("weight") else 1.0
        return cls(zone, filt, weight, text.strip())

    def matches(self, code: ipaddress.IPv4Address) -> bool:
        if self.filter is None:
            return code in _LOOPBACK
        return self.filter.matches(code)


def check_sites(value: list[str]) -> str | None:
    """Config validator for a list of sites."""
    for item in value:
        try:
            Site.parse(item)
        except ValueError as exc:
            return str(exc)
    return None


def check_symbol_sites(value: dict[str, str]) -> str | None:
    """Config validator for {symbol: site}."""
    for name, item in value.items():
        if not _SYMBOL.match(name):
            return f'"{name}" is not a symbol name (letters, digits, "_")'
        error = check_sites([item])
        if error:
            return error
    return None


# -- query names ----------------------------------------------------------------------


def ip_query(address: IPAddress, zone: str) -> str:
    """RFC 5782 §2.1/§2.4: reversed octets, or 32 reversed nibbles for IPv6."""
    if address.version == 4:
        return ".".join(reversed(str(address).split("."))) + "." + zone
    return ".".join(reversed(address.exploded.replace(":", ""))) + "." + zone


def domain_query(domain: str, zone: str) -> str | None:
    """RFC 5782 §2.3: `domain.zone`; None when the domain cannot be looked up."""
    name = ascii_domain(domain)
    if name is None or len(name) + len(zone) + 1 > 253:
        return None
    return f"{name}.{zone}"


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ZoneAnswer:
    """What one zone said about one subject."""

    zone: str
    query: str
    status: Literal["listed", "not_listed", "error"]
    codes: tuple[str, ...] = ()
    detail: str = ""  # why it is an error


@dataclass(frozen=True)
class ListResult:
    """Every zone's answer for one subject, and the decision taken from them.

    Subclasses name what was checked (`DnsblResult`, `HeloListResult`,
    `SenderListResult`), so later checks ask `results.get(DnsblResult)`.
    """

    subject: str
    answers: tuple[ZoneAnswer, ...] = ()
    weight: float = 0.0  # sum of the weights of the listing `sites`
    refused_by: str | None = None  # the zone named in the rejection, if refused
    reason: str = ""  # that zone's TXT reason
    symbols: tuple[str, ...] = ()

    @property
    def listed(self) -> tuple[str, ...]:
        return tuple(a.zone for a in self.answers if a.status == "listed")

    @property
    def errors(self) -> tuple[ZoneAnswer, ...]:
        return tuple(a for a in self.answers if a.status == "error")

    def counted(self) -> Iterable[Series]:
        """Each zone's answer, in spamgate_dnsbl_results_total (the runner counts)."""
        return counted_answers(self.answers)


def counted_answers(answers: Iterable[ZoneAnswer]) -> Iterable[Series]:
    for a in answers:
        yield DNSBL_RESULTS, (a.zone, a.status)


@dataclass(frozen=True)
class ListPolicy:
    """A check's lists: `sites` add up to a rejection, `symbols` add to the score."""

    sites: tuple[Site, ...] = ()
    threshold: float = 1.0
    symbols: tuple[tuple[str, Site], ...] = ()
    zones: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        every = [s.zone for s in self.sites] + [s.zone for _, s in self.symbols]
        object.__setattr__(self, "zones", tuple(dict.fromkeys(every)))

    @classmethod
    def build(cls, sites: list[str], threshold: float, symbols: dict[str, str]) -> ListPolicy:
        return cls(
            tuple(Site.parse(s) for s in sites),
            threshold,
            tuple((name, Site.parse(s)) for name, s in symbols.items()),
        )

    @property
    def enabled(self) -> bool:
        return bool(self.zones)

    def metric_series(self) -> Iterable[Series]:
        """Every zone's result series, created at zero with the check (`Check.metric_series`)."""
        for zone in self.zones:
            for result in ZONE_RESULTS:
                yield DNSBL_RESULTS, (zone, result)

    def _zone_sites(self, zone: str) -> Iterable[Site]:
        yield from (s for s in self.sites if s.zone == zone)
        yield from (s for _, s in self.symbols if s.zone == zone)

    async def query(
        self, resolver: Resolver, queries: dict[str, str], timeout: float
    ) -> dict[str, ZoneAnswer]:
        """Ask every zone at once; `queries` maps zone → name to look up.

        Answers already in the cache are read at once; only the others become
        concurrent lookups (a task each), which is what a warm cache saves.
        """
        zones = [z for z in self.zones if z in queries]
        found: dict[str, ZoneAnswer] = {}
        missing = []
        for zone in zones:
            cached = resolver.cached(queries[zone], "A")
            if cached is None:
                missing.append(zone)
            else:
                found[zone] = self._answer(zone, queries[zone], cached)
        if missing:
            asked = await asyncio.gather(
                *(self._ask(resolver, z, queries[z], timeout) for z in missing)
            )
            found.update(zip(missing, asked, strict=True))
        return {zone: found[zone] for zone in zones}

    async def _ask(self, resolver: Resolver, zone: str, name: str, timeout: float) -> ZoneAnswer:
        try:
            answer = await resolver.lookup(name, "A", timeout=timeout)
        except DnsError as exc:
            return ZoneAnswer(zone, name, "error", detail=f"lookup failed ({exc.kind})")
        return self._answer(zone, name, answer)

    def _answer(self, zone: str, name: str, answer: DnsAnswer) -> ZoneAnswer:
        return self._read(zone, name, answer.addresses)

    def _read(self, zone: str, name: str, addresses: list[str]) -> ZoneAnswer:
        if not addresses:
            return ZoneAnswer(zone, name, "not_listed")
        codes = tuple(sorted(addresses))
        refusals = [c for c in codes if c in ERROR_CODES]
        if refusals:
            why = ERROR_CODES[refusals[0]]
            return ZoneAnswer(zone, name, "error", codes, f"error code {refusals[0]} ({why})")
        parsed = [ipaddress.IPv4Address(c) for c in codes]  # A records
        if any(c not in _LOOPBACK for c in parsed):
            return ZoneAnswer(zone, name, "error", codes, f"answer {codes[0]} outside 127.0.0.0/8")
        if not any(s.matches(c) for s in self._zone_sites(zone) for c in parsed):
            return ZoneAnswer(zone, name, "error", codes, f"answer {codes[0]} outside the filter")
        return ZoneAnswer(zone, name, "listed", codes)

    def decide(self, answers: dict[str, ZoneAnswer]) -> tuple[float, Site | None, list[str]]:
        """(total weight, the site to name in a rejection or None, symbols that fired)."""

        def hit(site: Site) -> bool:
            a = answers.get(site.zone)
            return (
                a is not None
                and a.status == "listed"
                and any(site.matches(ipaddress.IPv4Address(c)) for c in a.codes)
            )

        listing = [s for s in self.sites if hit(s)]
        weight = sum(s.weight for s in listing)
        named = None
        if listing and weight >= self.threshold:
            named = max(listing, key=lambda s: s.weight)  # first of the heaviest
        return weight, named, [name for name, s in self.symbols if hit(s)]

    async def verdict(
        self,
        resolver: Resolver,
        queries: dict[str, str],
        *,
        subject: str,
        who: str,
        kind: type[ListResult],
        check: str,
        suffix: str = "",
    ) -> Verdict:
        """Ask, decide, and phrase the outcome for `subject` ("client", "HELO name").

        Everything, the TXT reason included, takes at most the resolver's lifetime.
        """
        budget = resolver.lifetime
        deadline = time.monotonic() + budget
        answers = await self.query(resolver, queries, budget)
        weight, named, fired = self.decide(answers)
        names = [f"{n}_{suffix}" if suffix else n for n in fired]
        by_name = dict(self.symbols)
        symbols = tuple(Symbol(sym, by_name[n].weight) for sym, n in zip(names, fired, strict=True))
        reason = ""
        if named is not None:
            reason = await txt_reason(resolver, queries[named.zone], deadline - time.monotonic())
        result = kind(
            subject,
            tuple(answers.values()),
            weight,
            named.zone if named else None,
            reason,
            tuple(names),
        )
        warn = describe_errors(answers.values())
        if named is None:
            return Verdict(symbols=symbols, warn=warn, result=result)
        text = f"Service unavailable; {who} [{subject}] blocked using {named.zone}"
        if reason:
            text += f"; {reason}"
        return Verdict(
            Action.REJECT,
            Reply.make(554, text, "5.7.1"),
            symbols=symbols,
            warn=warn,
            rule=f"{check}:{named.zone}",
            result=result,
        )


async def txt_reason(resolver: Resolver, name: str, timeout: float) -> str:
    """The zone's TXT text for a listing, made safe and short for an SMTP reply."""
    if timeout <= 0:
        return ""
    try:
        answer = await resolver.lookup(name, "TXT", timeout=timeout)
    except DnsError:
        return ""
    texts = answer.texts
    if not texts:
        return ""
    # printable ASCII only: the reply goes to clients that may not speak SMTPUTF8
    text = " ".join("".join(ch if " " <= ch <= "~" else " " for ch in texts[0]).split())
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 3] + "..."


def describe_errors(answers: Iterable[ZoneAnswer]) -> str | None:
    """One log line for the zones that failed, or None."""
    errors = [f"{a.zone}: {a.detail} for {a.query}" for a in answers if a.status == "error"]
    return "; ".join(errors) if errors else None
