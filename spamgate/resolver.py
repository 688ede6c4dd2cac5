"""The one DNS resolver every check shares: bounded, cached, de-duplicated.

DNS is where a before-queue filter hurts its users most: a resolver that takes 25 s
to time out stalls every session, and a thousand sessions asking for the same name
should not be a thousand queries. So all DNS goes through this module:

* a dnspython async resolver per nameserver, with a per-attempt `timeout` and a
  `lifetime` that bounds every lookup, enforced here so nothing can outlive it;
  the nameservers are asked in turn, each attempt within `timeout`, until one
  answers or the lifetime runs out;
* a circuit breaker per nameserver (`nameserver.py`): one that stopped answering
  is skipped, and with all of them down a lookup fails at once instead of
  waiting out its lifetime; a probe brings it back;
* dnspython's LRU cache, which honours TTLs for answers, NXDOMAIN and no-data alike
  (RFC 2308); errors and timeouts are not cached, so a recovered resolver is used
  at once. In front of it, a dict from the name as text to the `DnsAnswer` already
  made, valid until the same expiry: a cached lookup then costs a dict access
  rather than parsing the name, an LRU update and a new answer object (DNS list,
  client name and SPF lookups are a fifth of a message's CPU otherwise);
* in-flight de-duplication: a lookup that is already on the wire is joined, not
  repeated; a caller that gives up early leaves the shared query running so the
  others (and the cache) still get its answer;
* answers as small values (`DnsAnswer`) and failures as one exception (`DnsError`),
  so checks never deal with dnspython's exception zoo;
* a TXT record of no strings read as such (`_TxtOfNoStrings`), not as a reason
  to drop the whole answer.

`cached()` reads the cache without awaiting and is thread-safe, which lets pyspf,
running in a worker thread, use answers the event loop already has.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import dns.asyncresolver
import dns.exception
import dns.immutable
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver

from . import metrics
from .config.settings import parse_hostport
from .domains import ascii_lower, domain_key
from .nameserver import Nameserver, reached

if TYPE_CHECKING:
    from .config import DnsSettings
    from .model import IPAddress

log = logging.getLogger("spamgate.dns")

# XCLIENT's spellings (Postfix XCLIENT_README) for a client without a verified name.
UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"

# A reverse name is used only if it is a plausible host name (as Postfix's
# valid_hostname): letters, digits, "-" and "_", and not all-numeric at the end.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$"
)
_MAX_PTR_NAMES = 10  # forward-confirm at most this many PTR names (RFC 7208 §4.6.4 spirit)
PURGE_INTERVAL = 10.0  # seconds between sweeps of expired answers out of the cache

Status = Literal["answer", "nxdomain", "nodata"]


class DnsError(Exception):
    """The lookup gave no usable answer: `kind` is "timeout" or "error" (SERVFAIL,
    REFUSED, unreachable server, malformed reply)."""

    def __init__(self, kind: Literal["timeout", "error"], detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The outcome of one lookup that reached a verdict (possibly a negative one)."""

    name: str  # the name asked for, lower case, without the final dot
    rdtype: str
    status: Status
    records: tuple[dns.rdata.Rdata, ...] = ()
    # When the answer's TTL runs out (time.time(), as dnspython's cache keeps it);
    # 0 when unknown. Results derived from answers live no longer (SPF's memo).
    expires: float = field(default=0.0, compare=False)

    @property
    def addresses(self) -> list[str]:
        """A/AAAA answers as text."""
        return [r.address for r in self.records if hasattr(r, "address")]

    @property
    def texts(self) -> list[str]:
        """TXT answers, each record's strings joined (RFC 7208 §3.3), as text."""
        return [
            b"".join(r.strings).decode("utf-8", "replace")
            for r in self.records
            if hasattr(r, "strings")
        ]

    @property
    def targets(self) -> list[str]:
        """PTR/CNAME/NS targets as text, without the final dot."""
        return [r.target.to_text(omit_final_dot=True) for r in self.records if hasattr(r, "target")]


class Resolver(abc.ABC):
    """What checks and the session driver ask of DNS; `DnsResolver` asks the network.

    An interface, so that the composition root can be handed another: one that
    answers from a recording (replaying traffic offline), or records what it
    was asked. Answers are `DnsAnswer` values, failures one `DnsError`.
    """

    # Seconds one lookup may take in all: what checks budget for.
    lifetime: float

    @abc.abstractmethod
    def cached(self, name: str | dns.name.Name, rdtype: str) -> DnsAnswer | None:
        """The answer already known, or None; never waits (safe from any thread)."""

    @abc.abstractmethod
    async def lookup(
        self, name: str | dns.name.Name, rdtype: str, *, timeout: float | None = None
    ) -> DnsAnswer:
        """The answer for `name`/`rdtype`; DnsError on timeout or failure."""

    @abc.abstractmethod
    async def verified_name(self, address: IPAddress) -> str:
        """The forward-confirmed reverse name of `address`, or `[UNAVAILABLE]` /
        `[TEMPUNAVAIL]`."""

    def current(self, answers: Sequence[tuple[tuple[str, str], DnsAnswer]], until: float) -> bool:
        """Would a check asking again get these answers ((name, type) -> answer), the
        first of which expires at `until`? What a check keeps that was computed from
        answers (SPF's memo) holds only as long. From the network: until the TTL
        runs out."""
        return until > time.time()

    def reused(self, answers: Iterable[tuple[tuple[str, str], DnsAnswer]]) -> None:  # noqa: B027
        """A check decided from answers it kept itself ((name, type) -> answer: SPF's
        remembered results) rather than asking again: a recording resolver writes
        them down for the session, as if they had been asked for. No-op here."""

    async def aclose(self) -> None:  # noqa: B027 - a recording holds nothing to release
        """Stop what runs in the background."""


class DnsResolver(Resolver):
    """Async lookups through one dnspython resolver and one cache."""

    def __init__(self, settings: DnsSettings) -> None:
        self.timeout = settings.timeout
        self.lifetime = settings.lifetime
        self.cache = ExpiringLRUCache(settings.cache_size)
        self.nameservers = _nameservers(settings, self.cache)
        self._inflight: dict[tuple[dns.name.Name, int], asyncio.Task[DnsAnswer]] = {}
        # (name as given, type) -> the answer, while it lasts; see the module doc.
        self._front: dict[tuple[str, str], DnsAnswer] = {}
        self._front_size = settings.cache_size
        # client address -> (verified name or marker, until when)
        self._names: dict[IPAddress, tuple[str, float]] = {}
        self._purged = time.monotonic()

    # -- lookups ------------------------------------------------------------------------

    def cached(self, name: str | dns.name.Name, rdtype: str) -> DnsAnswer | None:
        """The cached answer, or None; never waits (safe from any thread)."""
        key = (name if isinstance(name, str) else name.to_text(), rdtype)
        hit = self._front.get(key)
        if hit is not None and hit.expires > time.time():
            self._count_cached(rdtype)
            return hit
        qname = _qname(name)
        if qname is None:
            return DnsAnswer(_text(name), rdtype, "nxdomain")
        kind = dns.rdatatype.from_text(rdtype)
        answer = self._peek(qname, kind, rdtype)
        if answer is not None:
            self._remember(key, answer)
            self._count_cached(rdtype)
        return answer

    def _count_cached(self, rdtype: str) -> None:
        metrics.child(metrics.DNS_QUERIES, rdtype, "cached").inc()

    def _remember(self, key: tuple[str, str], answer: DnsAnswer) -> None:
        front = self._front
        if len(front) >= self._front_size:
            # the oldest entry; another thread may be at it too
            with contextlib.suppress(RuntimeError, StopIteration):
                front.pop(next(iter(front)), None)
        front[key] = answer

    def _peek(self, qname: dns.name.Name, kind: int, rdtype: str) -> DnsAnswer | None:
        hit = self.cache.get((qname, kind, dns.rdataclass.IN))
        if hit is not None:
            return _from_answer(qname, rdtype, hit)
        # NXDOMAIN is cached once for every type, as dnspython does it.
        hit = self.cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
        if hit is not None and hit.response.rcode() == dns.rcode.NXDOMAIN:
            return DnsAnswer(_text(qname), rdtype, "nxdomain", expires=hit.expiration)
        return None

    async def lookup(
        self, name: str | dns.name.Name, rdtype: str, *, timeout: float | None = None
    ) -> DnsAnswer:
        """Resolve `name`/`rdtype`; raise DnsError on timeout or failure.

        `timeout` bounds this caller's wait (a check's remaining budget); the query
        itself is bounded by the configured lifetime either way. A name that is not
        a valid DNS name, or has no IDNA 2008 A-label form (see `_qname`), cannot
        exist, and is answered NXDOMAIN without a query.
        """
        cached = self.cached(name, rdtype)
        if cached is not None:
            return cached
        qname = _qname(name)
        assert qname is not None  # cached() answered invalid names
        key = (qname, dns.rdatatype.from_text(rdtype))
        task = self._inflight.get(key)
        if task is None:
            if time.monotonic() - self._purged >= PURGE_INTERVAL:
                self._sweep()
            task = asyncio.ensure_future(self._query(qname, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda t, k=key: self._finished(k, t))
        else:
            metrics.DNS_QUERIES.labels(rdtype, "shared").inc()
        try:
            # shield: a caller that gives up must not cancel the others' query.
            async with asyncio.timeout(timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            raise DnsError(
                "timeout", f"{_text(qname)}/{rdtype}: no answer in {timeout:g}s"
            ) from None

    def _finished(self, key: tuple[dns.name.Name, int], task: asyncio.Task[DnsAnswer]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # seen: every caller may have given up on it already

    async def _query(self, qname: dns.name.Name, rdtype: str) -> DnsAnswer:
        if not any(ns.up for ns in self.nameservers):
            # Every nameserver is down (its breaker open): no query would be answered.
            metrics.DNS_QUERIES.labels(rdtype, "breaker_open").inc()
            raise DnsError("error", f"{_text(qname)}/{rdtype}: {self._all_down()}")
        started = time.perf_counter()
        result = "error"
        try:
            async with asyncio.timeout(self.lifetime):
                answer = await self._ask(qname, rdtype)
            out = _from_answer(qname, rdtype, answer)
            result = out.status
            return out
        except dns.resolver.NXDOMAIN:
            result = "nxdomain"
            hit = self.cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
            expires = hit.expiration if hit is not None else 0.0
            return DnsAnswer(_text(qname), rdtype, "nxdomain", expires=expires)
        except (TimeoutError, dns.exception.Timeout):
            result = "timeout"
            raise DnsError(
                "timeout", f"{_text(qname)}/{rdtype}: no answer in {self.lifetime:g}s"
            ) from None
        except dns.resolver.NoNameservers as exc:
            raise DnsError("error", f"{_text(qname)}/{rdtype}: {_servers_said(exc)}") from None
        except dns.exception.DNSException as exc:
            raise DnsError("error", f"{_text(qname)}/{rdtype}: {exc}") from None
        finally:
            metrics.DNS_QUERIES.labels(rdtype, result).inc()
            metrics.DNS_LATENCY.labels(rdtype).observe(time.perf_counter() - started)

    async def _ask(self, qname: dns.name.Name, rdtype: str) -> dns.resolver.Answer:
        """Ask the nameservers that are up in turn, one attempt of `timeout` each,
        round after round until one answers (the caller bounds it by the lifetime).

        An answer of any kind ends it: NXDOMAIN and no-data are answers; SERVFAIL
        or REFUSED from one nameserver passes to the next, and from all of them is
        the lookup's error. No answer at all counts against the nameserver's
        breaker; when every breaker is open the lookup fails at once.
        """
        while True:
            servers = [ns for ns in self.nameservers if ns.up]
            if not servers:  # found down while this lookup was on its way
                raise DnsError("error", f"{_text(qname)}/{rdtype}: {self._all_down()}")
            refused: dns.resolver.NoNameservers | None = None
            for ns in servers:
                try:
                    answer = await ns.resolver.resolve(
                        qname,
                        rdtype,
                        search=False,
                        raise_on_no_answer=False,
                        lifetime=self.timeout,
                    )
                except dns.resolver.NXDOMAIN:
                    ns.answered()
                    raise
                except dns.resolver.NoNameservers as exc:
                    if not reached(exc):
                        ns.unanswered(_servers_said(exc))
                        continue
                    ns.answered()
                    refused = exc
                    continue
                except dns.exception.Timeout:
                    ns.unanswered("timeout")
                    continue
                except dns.exception.DNSException:
                    ns.answered()  # it answered: with something we cannot use
                    raise
                ns.answered()
                return answer
            if refused is not None:
                raise refused

    def _all_down(self) -> str:
        names = ", ".join(ns.label for ns in self.nameservers)
        return f"no nameserver is answering ({names}: down, probed in the background)"

    # -- the client's name ----------------------------------------------------------------

    async def verified_name(self, address: IPAddress) -> str:
        """The forward-confirmed reverse name of `address` (FCrDNS), or a marker.

        `[UNAVAILABLE]` when there is no PTR or no PTR name resolves back to the
        address; `[TEMPUNAVAIL]` when DNS failed and a confirmation might exist (as
        Postfix's smtpd does). The whole lookup takes at most one `lifetime`.
        A found name (or its absence) is kept until the first answer it came from
        expires, so a client that comes back costs one dict access.
        """
        known = self._names.get(address)
        if known is not None:
            if known[1] > time.time():
                return known[0]
            del self._names[address]
        try:
            async with asyncio.timeout(self.lifetime):
                name, expires = await self._verified_name(address)
        except TimeoutError:
            return TEMPUNAVAIL
        if name != TEMPUNAVAIL and expires > time.time():
            if len(self._names) >= self._front_size:
                del self._names[next(iter(self._names))]
            self._names[address] = (name, expires)
        return name

    async def _verified_name(self, address: IPAddress) -> tuple[str, float]:
        """The name or marker, and until when it holds (the answers' first expiry)."""
        try:
            ptr = await self.lookup(address.reverse_pointer, "PTR")
        except DnsError:
            return TEMPUNAVAIL, 0.0
        expires = ptr.expires
        names = [n.lower() for n in dict.fromkeys(ptr.targets) if _plausible_host(n)]
        if not names:
            return UNAVAILABLE, expires
        names = names[:_MAX_PTR_NAMES]
        rdtype = "A" if address.version == 4 else "AAAA"
        forward: list[DnsAnswer | BaseException | None] = [self.cached(n, rdtype) for n in names]
        missing = [i for i, answer in enumerate(forward) if answer is None]
        if missing:
            asked = await asyncio.gather(
                *(self.lookup(names[i], rdtype) for i in missing), return_exceptions=True
            )
            for i, answer in zip(missing, asked, strict=True):
                forward[i] = answer
        failed = False
        for name, result in zip(names, forward, strict=True):
            if isinstance(result, DnsError):
                failed = True
            elif isinstance(result, BaseException):
                raise result
            else:
                assert result is not None
                expires = min(expires, result.expires)
                if any(ipaddress.ip_address(a) == address for a in result.addresses):
                    return name, expires
        return (TEMPUNAVAIL, 0.0) if failed else (UNAVAILABLE, expires)

    def _sweep(self) -> None:
        """Drop expired answers and names: most are asked for once (see ExpiringLRUCache)."""
        self._purged = time.monotonic()
        self.cache.purge_expired()
        now = time.time()
        # pyspf's threads may add to the front cache meanwhile: a missed entry
        # waits for the next sweep.
        with contextlib.suppress(RuntimeError):
            for key in [k for k, answer in list(self._front.items()) if answer.expires <= now]:
                self._front.pop(key, None)
        for address in [a for a, (_, until) in self._names.items() if until <= now]:
            del self._names[address]

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        self._inflight.clear()
        for ns in self.nameservers:
            await ns.aclose()


class ExpiringLRUCache(dns.resolver.LRUCache):
    """dnspython's LRU cache, plus a sweep that drops answers whose TTL ran out.

    The LRU cache drops an expired answer only when the same name is asked for
    again; most names spamgate looks up are asked for once (a DNS list or PTR
    query per client address, an SPF record per sender domain), so without a
    sweep they stayed until `cache_size` pushed them out, at some 4-8 KB each:
    memory grew for as long as the cache was filling (hundreds of MB at the
    default size). With the sweep the cache holds what is still valid.
    """

    def purge_expired(self) -> int:
        now = time.time()
        with self.lock:
            expired = [node for node in self.data.values() if node.value.expiration <= now]
            for node in expired:
                node.unlink()
                del self.data[node.key]
        return len(expired)


@dns.immutable.immutable
class _TxtOfNoStrings(dns.rdtypes.ANY.TXT.TXT):
    """A TXT record that may hold no strings at all.

    RFC 1035 §3.3.14 gives TXT "one or more" strings, but records of none
    (RDLENGTH 0) are published. dnspython refuses to build one; its resolver then
    drops the whole response as malformed and waits for another until the
    lifetime runs out: an answer that came at once became a 5 s "timeout", an SPF
    temperror, a DKIM key "not found in time". Read it as what it is, a record of
    zero strings: it joins to "", which is no SPF record, no DKIM key and no DMARC
    policy. Installed in place of dnspython's TXT class for class IN when this
    module is imported.
    """

    def __init__(self, rdclass, rdtype, strings) -> None:  # type: ignore[no-untyped-def]
        strings = tuple(strings)
        super().__init__(rdclass, rdtype, strings or (b"",))
        if not strings:
            object.__setattr__(self, "strings", ())


def _accept_txt_of_no_strings() -> None:
    # dnspython has no public way to replace the class of a type it implements
    # (register_type refuses one): its table, keyed by (class, type), is set here.
    dns.rdata.get_rdata_class(dns.rdataclass.IN, dns.rdatatype.TXT)
    dns.rdata._rdata_classes[(dns.rdataclass.IN, dns.rdatatype.TXT)] = _TxtOfNoStrings


_accept_txt_of_no_strings()


def _nameservers(settings: DnsSettings, cache: dns.resolver.LRUCache) -> list[Nameserver]:
    """The configured nameservers (or /etc/resolv.conf's), each with a resolver of
    its own on the shared cache."""
    addresses: list[tuple[str, int]] = []
    if settings.nameservers:
        addresses = [parse_hostport(item) for item in settings.nameservers]
    else:
        try:
            system = dns.asyncresolver.Resolver()  # /etc/resolv.conf
            for server in system.nameservers:
                if isinstance(server, dns.nameserver.Do53Nameserver):
                    addresses.append((server.address, server.port))
                elif isinstance(server, str):
                    addresses.append((server, system.port))
        except dns.resolver.NoResolverConfiguration:
            pass
        if not addresses:
            log.warning("no nameservers in /etc/resolv.conf; using 127.0.0.1:53")
            addresses = [("127.0.0.1", 53)]
    out = []
    for host, port in addresses:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)]
        resolver.timeout = settings.timeout
        resolver.lifetime = settings.lifetime
        # Room for SPF TXT records and DNSBL TXT reasons without a TCP retry (DNS
        # flag day 2020).
        resolver.use_edns(0, 0, 1232)
        resolver.cache = cache
        out.append(
            Nameserver(
                host,
                port,
                resolver,
                failures=settings.breaker_failures,
                probe_interval=settings.probe_interval,
                probe_timeout=settings.timeout,
            )
        )
    return out


def _qname(name: str | dns.name.Name) -> dns.name.Name | None:
    """The name to ask for, or None for one that cannot exist.

    A name given as text is taken literally, label by label: not through
    dnspython's `from_text`, whose IDNA 2003 codec maps look-alikes onto other
    names (the Kelvin sign to "k", full-width letters to ASCII) and which reads
    "\\107" as an escape for "k". Its non-ASCII labels must have an IDNA 2008
    A-label form (`domains.domain_key`); a name without one is not asked for.
    """
    if isinstance(name, dns.name.Name):
        return name if name.is_absolute() else name.concatenate(dns.name.root)
    key = domain_key(name)
    if key is None:
        return None
    labels = [label.encode("ascii") for label in key.split(".")] if key else []
    try:
        return dns.name.Name([*labels, b""])
    except dns.exception.DNSException:  # an empty label, one too long, a name too long
        return None


def _text(name: str | dns.name.Name) -> str:
    text = name.to_text(omit_final_dot=True) if isinstance(name, dns.name.Name) else name
    return ascii_lower(text).rstrip(".")


def _from_answer(qname: dns.name.Name, rdtype: str, answer: dns.resolver.Answer) -> DnsAnswer:
    if answer.rrset is None:
        return DnsAnswer(_text(qname), rdtype, "nodata", expires=answer.expiration)
    return DnsAnswer(_text(qname), rdtype, "answer", tuple(answer.rrset), answer.expiration)


def _servers_said(exc: dns.resolver.NoNameservers) -> str:
    """NoNameservers' long text, shortened to what each server answered."""
    errors = exc.kwargs.get("errors") or []
    said = [str(e[3]) for e in errors if len(e) > 3]
    return "; ".join(dict.fromkeys(said)) or "no nameserver answered"


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)+{_LABEL}", re.IGNORECASE)


def is_domain(name: str) -> bool:
    """A DNS name of two labels or more, of letters, digits, "-" and "_" (A-labels
    for IDN): what can be looked up as a mail domain or a list key. One match of
    the whole name (every SPF check and list query asks)."""
    return len(name) <= 253 and _DOMAIN.fullmatch(name) is not None


def ascii_domain(name: str, *, lenient: bool = False) -> str | None:
    """`name` as a lower-case A-label domain ready to look up, or None if it is not
    a domain (an address literal, a single label, bad characters) or has no IDNA
    2008 A-label form.

    Strict for names from clients (`domains.domain_key`): never Python's Unicode
    case mapping or the IDNA 2003 codec, which turn "ban\u212a.test" (Kelvin sign)
    into "bank.test" and would give a look-alike the real domain's SPF, DMARC
    policy and list entries. `lenient` (UTS 46 mapping) is for names an admin
    configured.
    """
    key = domain_key(name, lenient=lenient)
    return key if key is not None and is_domain(key) else None


def _plausible_host(name: str) -> bool:
    return bool(_HOSTNAME.match(name)) and not name.rsplit(".", 1)[-1].isdigit()
