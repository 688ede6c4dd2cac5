"""pyspf, run off the event loop, with every DNS answer from the shared resolver.

pyspf is synchronous and looks names up through one process-global hook,
`spf.DNSLookup`. The usual bridge runs it in a thread that blocks on each lookup
until the event loop has the answer; then a slow resolver holds one thread per SPF
check for the whole budget, and a burst of them empties the pool for everyone.

Here a worker thread never waits for DNS. pyspf runs against what this evaluation
already knows (its own answers so far, then the shared cache, read without
waiting); the first name it lacks stops the run. The event loop then looks that
name up (asynchronously, cached, de-duplicated, within the remaining budget) and
runs pyspf again from the start. A run is pure computation on known answers, so
replaying it is cheap and gives the same result as one uninterrupted run; with a
warm cache the whole check is a single run. The time budget is enforced by the
event loop alone, and a DNS failure becomes pyspf's own TempError, so RFC 7208
semantics (lookup limits, void lookups, temperror) stay pyspf's.

The hook is installed once; outside an evaluation of ours (another caller of pyspf
in this process) it hands over to pyspf's own lookup. One method of pyspf's is
replaced for our evaluations: DNS errors in the `ptr` mechanism (`_Query`), and
pyspf's Unicode lower-casing of the names it looks up.

A result is remembered, by client address, sender domain and HELO name, until the
first of the DNS answers it was computed from expires: the same question asked
again within those TTLs has the same answer, so it is given without a thread hop
or a pyspf run (half the CPU of a message with SPF on, for a sender that mails
often). Only results reached with every answer in hand are kept (no DNS failure,
no budget or round limit), and none whose records hold a macro: "%{l}" and its
kind make the result depend on the local part, the time or the receiver. The
answers are kept with it and handed to `Resolver.reused` when it is given again,
so that a recording of the session (`spamgate replay`) holds them as if they had
been asked for; whether they still hold is the resolver's to say
(`Resolver.current`: the network's until their TTLs run out, a replay's while
the record being replayed has the same answers).

pyspf's worker thread runs in a copy of the asking session's context
(`contextvars`), as `asyncio.to_thread` would: what the resolver's `cached()` is
asked from there is known to be that session's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import math
import threading
from dataclasses import dataclass
from typing import Any

import spf

from ...domains import ascii_lower, domain_key
from ...resolver import DnsAnswer, DnsError, Resolver, ascii_domain

# Enough for any record within RFC 7208's limits (10 DNS mechanisms, 10 names per
# mx/ptr, fetched together); more means something is wrong: temperror.
MAX_ROUNDS = 60
_MAX_NAMES = 10  # spf.MAX_MX / spf.MAX_PTR: address lookups per mx or ptr term
MEMO_SIZE = 20000  # remembered results, oldest dropped first

_local = threading.local()
_install_lock = threading.Lock()
_pyspf_lookup = spf.DNSLookup


class _Missing(Exception):
    """Raised inside pyspf for a name this evaluation has no answer for yet."""


def _lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list:
    evaluation: _Evaluation | None = getattr(_local, "evaluation", None)
    if evaluation is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    return evaluation.answer(name, qtype)


def _install() -> None:
    with _install_lock:
        if spf.DNSLookup is not _lookup:
            spf.DNSLookup = _lookup


@dataclass(frozen=True, slots=True)
class SpfOutcome:
    result: str  # pass, fail, softfail, neutral, none, temperror, permerror
    explanation: str  # pyspf's text: the domain's explanation, or what went wrong
    rounds: int = 1  # pyspf runs it took (1 when every answer was cached, 0: remembered)


class _Evaluation:
    """One check_host()'s view of DNS: answers fetched so far, by (name, type)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.known: dict[tuple[str, str], list | DnsError] = {}
        self.missing: list[tuple[str, str]] = []
        # The answers received, for the memo (`Resolver.reused`).
        self.used: list[tuple[tuple[str, str], DnsAnswer]] = []
        # Until when the result holds (the first answer to expire), and whether it
        # may be remembered at all (no DNS error, no macro in a record).
        self.expires = math.inf
        self.memorable = True

    def note(self, key: tuple[str, str], answer: DnsAnswer | DnsError) -> None:
        """Keep an answer for the runs to come, and what it means for the memo."""
        if isinstance(answer, DnsError):
            self.known[key] = answer
            self.memorable = False
            return
        values = _values(answer)
        self.known[key] = values
        self.used.append((key, answer))
        self.expires = min(self.expires, answer.expires)
        if answer.rdtype in ("TXT", "SPF") and any(b"%" in part for v in values for part in v):
            self.memorable = False

    def answer(self, name: str, qtype: str) -> list:
        """pyspf's DNSLookup contract: [((name, type), value), ...]; [] for none."""
        key = (ascii_lower(name).rstrip("."), qtype.upper())
        if key not in self.known:
            cached = self.resolver.cached(*key)
            if cached is None:
                # pyspf swallows exceptions around exp= lookups: remember the miss
                # so that the run is repeated even then.
                self.missing.append(key)
                raise _Missing(key)
            self.note(key, cached)
        value = self.known[key]
        if isinstance(value, DnsError):
            raise spf.TempError(f"DNS {value}")
        return [(key, v) for v in value]


def _values(answer: DnsAnswer) -> list:
    """Records in the shapes pyspf's own dnspython lookup returns."""
    out: list = []
    for r in answer.records:
        if answer.rdtype in ("A", "AAAA"):
            out.append(r.address)
        elif answer.rdtype == "MX":
            out.append((r.preference, r.exchange.to_text(omit_final_dot=True)))
        elif answer.rdtype == "PTR":
            out.append(r.target.to_text(omit_final_dot=True))
        elif answer.rdtype in ("TXT", "SPF"):
            # A record of no strings joins to b"" like one empty string, which is
            # how pyspf gets it: its dns_txt() fails on a lone () (IndexError).
            out.append(tuple(r.strings) or (b"",))
    return out


class SpfEngine:
    """Evaluates SPF (RFC 7208 check_host) for the checks, within a time budget."""

    def __init__(
        self, resolver: Resolver, threads: concurrent.futures.Executor, budget: float
    ) -> None:
        _install()
        self.resolver = resolver
        self.threads = threads
        self.budget = budget
        # (client, sender, HELO) -> (outcome, until, the answers); see the module doc.
        self._memo: dict[tuple[str, str, str], tuple[SpfOutcome, float, tuple]] = {}

    async def check(self, ip: str, sender: str, helo: str) -> SpfOutcome:
        """check_host() for `sender` (empty: postmaster@`helo`, RFC 7208 §2.4)."""
        local, _, domain = (sender or f"postmaster@{helo}").rpartition("@")
        name = ascii_domain(domain)
        if name is None:
            return SpfOutcome("none", "", rounds=0)  # RFC 7208 §4.3: not a domain
        if sender:
            sender, helo = f"{local}@{name}", ascii_domain(helo) or helo
        else:
            helo = name
        # The local part counts only through macros, and results from records
        # with macros are never remembered: the domain is the key.
        key = (ip, name, helo)
        memo = self._memo.get(key)
        if memo is not None:
            if self.resolver.current(memo[2], memo[1]):
                self.resolver.reused(memo[2])
                return memo[0]
            del self._memo[key]
        evaluation = _Evaluation(self.resolver)
        loop = asyncio.get_running_loop()
        family = "AAAA" if ":" in ip else "A"
        try:
            async with asyncio.timeout(self.budget) as scope:
                for rounds in range(1, MAX_ROUNDS + 1):
                    outcome = await loop.run_in_executor(
                        self.threads,
                        contextvars.copy_context().run,
                        _run,
                        evaluation,
                        ip,
                        sender,
                        helo,
                    )
                    if not evaluation.missing:
                        assert outcome is not None
                        result = SpfOutcome(*outcome, rounds=rounds)
                        self._remember(key, result, evaluation)
                        return result
                    remaining = scope.when() - loop.time()  # type: ignore[operator]
                    await self._fetch(evaluation, family, remaining)
        except TimeoutError:
            return SpfOutcome("temperror", f"SPF evaluation took more than {self.budget:g}s")
        return SpfOutcome("temperror", f"SPF evaluation needed more than {MAX_ROUNDS} rounds")

    def _remember(
        self, key: tuple[str, str, str], outcome: SpfOutcome, evaluation: _Evaluation
    ) -> None:
        used = tuple(evaluation.used)
        if not evaluation.memorable or not self.resolver.current(used, evaluation.expires):
            return
        if len(self._memo) >= MEMO_SIZE:
            del self._memo[next(iter(self._memo))]
        remembered = SpfOutcome(outcome.result, outcome.explanation, rounds=0)
        self._memo[key] = (remembered, evaluation.expires, used)

    async def _fetch(self, evaluation: _Evaluation, family: str, timeout: float) -> None:
        keys = list(dict.fromkeys(evaluation.missing))
        answers = await self._lookups(keys, timeout)
        # An mx or ptr term looks up the address of each name it gets (at most 10):
        # ask for them all now, at once, rather than one per run.
        follow: list[tuple[str, str]] = []
        for (name, qtype), answer in zip(keys, answers, strict=True):
            evaluation.note((name, qtype), answer)
            if isinstance(answer, DnsAnswer) and qtype in ("MX", "PTR"):
                targets = [v[1] if qtype == "MX" else v for v in _values(answer)]
                if len(targets) <= _MAX_NAMES:
                    follow += [(t.lower(), family) for t in targets]
        follow = [k for k in dict.fromkeys(follow) if k not in evaluation.known]
        if follow:
            for key, answer in zip(follow, await self._lookups(follow, timeout), strict=True):
                evaluation.note(key, answer)

    async def _lookups(
        self, keys: list[tuple[str, str]], timeout: float
    ) -> list[DnsAnswer | DnsError]:
        results = await asyncio.gather(
            *(self.resolver.lookup(name, qtype, timeout=timeout) for name, qtype in keys),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException) and not isinstance(r, DnsError):
                raise r
        return results  # type: ignore[return-value]


class _Query(spf.query):
    """pyspf's query, with the `ptr` mechanism's DNS errors as RFC 7208 §5.5 has them.

    pyspf turns any DNS error met while validating PTR names into temperror. The
    RFC says otherwise: "If a DNS error occurs while doing the PTR RR lookup, then
    this mechanism fails to match. If a DNS error occurs while doing an A RR
    lookup, then that domain name is skipped and the search continues." A PTR
    name that is a CNAME loop (a resolver says SERVFAIL) is such an error (the
    RFC 7208 test suite's ptr-cname-loop). The %{p} macro uses the same list, and
    "unknown" when it is empty (§7.3). A missing answer (`_Missing`) is not a DNS
    error and still stops the run.
    """

    def dns(self, name, qtype, cnames=None, ignore_void=False):  # type: ignore[no-untyped-def]
        """pyspf's lookup, for a name held to IDNA 2008 first (`domains.domain_key`).

        pyspf lower-cases every name with Python's Unicode case mapping, which makes
        a Kelvin sign a "k": a name built from client input (the HELO name in
        %{h}, a UTF-8 local part in %{l}) could then be looked up as another
        domain's. A name with no A-label form does not exist: no records, as
        pyspf answers a name that is not a valid DNS name.
        """
        key = domain_key(str(name)) if name else name
        if key is None:
            return []
        return super().dns(key, qtype, cnames, ignore_void)

    def validated_ptrs(self) -> list[str]:
        most = spf.MAX_PTR if self.strict else spf.MAX_PTR * 4
        try:
            names = self.dns_ptr(self.i)[:most]
        except spf.TempError:
            return []
        validated = []
        for name in names:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(name)
        return validated


def _run(evaluation: _Evaluation, ip: str, sender: str, helo: str) -> tuple[str, str] | None:
    """One pyspf run in a worker thread; None if it stopped at a missing answer."""
    evaluation.missing = []
    _local.evaluation = evaluation
    try:
        result, _code, explanation = _Query(i=ip, s=sender, h=helo).check()
    except _Missing:
        return None
    finally:
        _local.evaluation = None
    return result, explanation
