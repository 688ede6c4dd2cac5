"""DMARC (RFC 7489): the From domain's policy, applied at end of data.

The author domain is the domain of the header From address. Its policy is the
`_dmarc.<domain>` TXT record, or failing that the one of its organisational
domain (the public suffix plus one label, from the `publicsuffixlist` package,
which follows the Public Suffix List in its releases). The `dmarc` package parses
the record and evaluates alignment: DMARC passes when SPF (the MAIL FROM domain,
or the HELO name for the null sender) or a DKIM signature's d= passes *and* is
aligned with the author domain, relaxed (same organisational domain) or strict
(same domain) as the record says.

Then the policy is applied: by default `p=reject` refuses the message (550 5.7.1,
naming DMARC), `p=quarantine` adds the DMARC_QUARANTINE symbol (its score, 5,
reaches the default tag threshold, so the message is tagged), `p=none` does
nothing; each is configurable (reject, hold, score, continue). `pct=` samples the
messages the policy applies to, the others getting the next milder policy
(§6.6.4); `sp=` applies to subdomains of the domain that published it.

Where this differs from the letter of a plain evaluation, it is to avoid refusing
legitimate mail on incomplete evidence:
* a DNS failure looking up the policy is dmarc=temperror, and by default lets the
  message through;
* an identifier that would have aligned but could not be evaluated (SPF or DKIM
  temperror) makes a would-be fail temperror too.

Incomplete evidence of spamgate's own making is another matter. When the SPF or
DKIM check itself failed (a DKIM worker process died, verification ran out of
time with the keys in hand, an exception: the runner's `CheckFailures`) for an
identifier that would have aligned, the sender did nothing wrong and neither did
its DNS, and letting the message through as temperror would turn a p=reject
into an accept whenever our machinery breaks, which a forger can sometimes
provoke (a message large enough to exhaust the time budget). So where the
policy's action is not "continue", `internal_error` decides: by default
"tempfail" (451 4.3.0: the sender retries, and a working spamgate judges the
message), counted in spamgate_dmarc_internal_errors_total. A failure of the
DMARC check itself tempfails the message in the same way (its on_error).

Also:
* DMARC needs both SPF and DKIM enabled: with one of them off, mail that passes
  only through the other would be refused (a configuration error says so).

A message with no From field, several From fields, or a From without an address
domain is outside DMARC (RFC 7489 §6.6.1: such messages are "typically
rejected", and RFC 5322 requires exactly one From); `bad_from` says what to do
(reject by default). So is a From domain that is no DNS domain name: a single
label, an address literal, or one with no IDNA 2008 A-label form, such as a
look-alike written with compatibility characters ("ban\u212a.test", Kelvin
sign). Such a domain cannot exist (§6.6.1 would have mail from a non-existent
domain refused), and it is never looked up as the domain it resembles, whose
policy and alignment it would otherwise borrow.

A From field with several addresses is evaluated for each distinct domain, and
the strictest policy among those that fail applies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.policy
import email.utils
import random
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import dmarc as dmarclib
from publicsuffixlist import PublicSuffixList

from ..config.settings import ConfigError, positive, setting
from ..message import Message
from ..model import Stage, Transaction
from ..pipeline.check import Check, CheckContext, Series
from ..pipeline.verdict import DUNNO, Action, CheckFailures, Symbol, Verdict
from ..reply import Reply
from ..resolver import DnsError, Resolver, ascii_domain
from .dkim import DkimResults
from .engines.dkimverify import describe
from .spf import SpfResult

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

PolicyAction = Literal["reject", "hold", "score", "continue"]
# Where results are counted: RFC 8601 words by method, and internal errors by cause.
AUTH_RESULTS = "spamgate_auth_results_total"
INTERNAL_ERRORS = "spamgate_dmarc_internal_errors_total"

SCORES = {
    "DMARC_REJECT": 10.0,
    "DMARC_QUARANTINE": 5.0,
    "DMARC_NONE": 0.0,
    "DMARC_TEMPERROR": 0.0,
    "DMARC_BAD_FROM": 5.0,
}
# Stricter first: a message failing several author domains gets the strictest.
_STRICTNESS = {"reject": 2, "quarantine": 1, "none": 0}
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_VERSION = re.compile(r"^v\s*=\s*DMARC1\s*(;|$)")


@dataclass(frozen=True)
class DmarcSettings:
    enabled: bool = setting(
        False, "Apply the From domain's DMARC policy (RFC 7489); needs [spf] and [dkim]."
    )
    timeout: float = setting(
        10.0, "Seconds for the policy lookups; then dmarc=temperror.", check=positive
    )
    p_reject: PolicyAction = setting(
        "reject",
        'Mail failing DMARC of a domain with p=reject: "reject" (550 5.7.1), "hold" '
        '(quarantine Maildir), "score" (DMARC_REJECT, 10), "continue".',
    )
    p_quarantine: PolicyAction = setting(
        "score",
        "Mail failing DMARC of a domain with p=quarantine: as p_reject; symbol "
        "DMARC_QUARANTINE (5: tagged at the default [scoring] tag).",
    )
    p_none: PolicyAction = setting(
        "continue", "Mail failing DMARC of a domain with p=none: as p_reject; symbol DMARC_NONE."
    )
    temperror: Literal["tempfail", "score", "continue"] = setting(
        "continue",
        'The policy could not be looked up or judged (DNS failure): "tempfail" (451 '
        '4.7.1), "score" (DMARC_TEMPERROR), "continue".',
    )
    internal_error: Literal["tempfail", "fail", "temperror"] = setting(
        "tempfail",
        "The SPF or DKIM check failed inside spamgate (a DKIM worker died, an exception, "
        "out of time with the keys in hand) for an identifier that would have aligned, "
        'and the policy\'s action is not "continue": "tempfail" (451 4.3.0), "fail" '
        '(judged as a DMARC fail: the policy\'s action), "temperror" (as a DNS failure: '
        "`temperror` decides). A failure of the DMARC check itself: 451 4.3.0 unless "
        '"fail" or "temperror".',
    )
    bad_from: Literal["reject", "score", "continue"] = setting(
        "reject",
        "No From field, several, or one without an address: "
        '"reject" (550 5.7.1), "score" (DMARC_BAD_FROM, 5), "continue".',
    )
    pct: bool = setting(
        True,
        "Honour pct=: apply the policy to that share of failing mail, the next milder "
        "one to the rest (RFC 7489 §6.6.4).",
    )


@dataclass(frozen=True)
class DmarcResult:
    """DMARC for one author domain.

    `result` is pass, fail, none (no policy), temperror or permerror (a policy
    record that does not parse). `policy` is the policy that applied (p=, or sp=
    for a subdomain), `disposition` what it asked for after pct= sampling.
    """

    result: str
    domain: str  # the author (From) domain
    policy: str = ""  # none, quarantine, reject; "" without a record
    disposition: str = "none"
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""
    # temperror because a check of ours failed: "spf" or "dkim" (see internal_error)
    internal: str = ""


@dataclass(frozen=True)
class DmarcResults:
    """DMARC for every author domain of the message; `problem` when there is none to
    judge (no From field, several, no address domain)."""

    results: tuple[DmarcResult, ...] = ()
    problem: str = ""

    def counted(self) -> Iterable[Series]:
        """The outcome in spamgate_auth_results_total, and the first internal error's
        cause (spf, dkim) in spamgate_dmarc_internal_errors_total."""
        yield AUTH_RESULTS, ("dmarc", self.result)
        internal = [r.internal for r in self.results if r.internal]
        if internal:
            yield INTERNAL_ERRORS, (internal[0],)

    @property
    def result(self) -> str:
        if self.problem:
            return "permerror"
        kinds = {r.result for r in self.results}
        for kind in ("fail", "temperror", "permerror", "pass"):
            if kind in kinds:
                return kind
        return "none"


@dataclass(frozen=True)
class InternalError:
    """This check itself failed (a bug): counted as an internal error, cause "dmarc"."""

    cause: str

    def counted(self) -> Iterable[Series]:
        yield INTERNAL_ERRORS, (self.cause,)


_psl: PublicSuffixList | None = None
_psl_lock = threading.Lock()


def public_suffixes() -> PublicSuffixList:
    """The Public Suffix List, loaded once per process (it takes a moment)."""
    global _psl
    with _psl_lock:
        if _psl is None:
            _psl = PublicSuffixList()
        return _psl


def org_domain(domain: str) -> str | None:
    """The organisational domain (RFC 7489 §3.2), or None for a public suffix."""
    return public_suffixes().privatesuffix(domain)


class _Suffixes:
    """What the dmarc package asks of a public suffix list: the organisational domain."""

    def get_public_suffix(self, domain: str) -> str:
        return org_domain(domain) or domain


# A From value of the plain shapes nearly all mail has, which both parsers below
# provably read as this one address (tests/unit/checks/test_dmarc_from.py compares
# them on generated values): `local@domain`, `<local@domain>`, or a display name of
# plain words, MIME encoded words or one quoted string before `<local@domain>`.
# Everything else (comments, groups, several addresses, routes, specials, escapes,
# non-ASCII) is read by both parsers.
_WORD = r"(?:[A-Za-z0-9_+-]+|=\?[A-Za-z0-9_-]+\?[BbQq]\?[A-Za-z0-9+/=_.-]*\?=)"
_PHRASE = r"(?:" + _WORD + r"(?: " + _WORD + r")*|\"[A-Za-z0-9 _+.,'-]*\")"
_ADDRESS = r"[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*@(?P<domain>[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)"
_PLAIN_FROM = (
    re.compile(_ADDRESS),
    re.compile(r"(?:" + _PHRASE + r" ?)?<" + _ADDRESS + r">"),
)


def author_domains(message: Message) -> tuple[list[str], str]:
    """The distinct From domains (A-labels, lower case), or a problem text.

    The field is read by two parsers, the lenient `getaddresses` and the strict
    `email.headerregistry` one, and every domain either finds counts: a From line
    they read differently (crafted to show one domain and be judged on another)
    is then judged on all of them, the strictest result winning. A From of the
    plain shapes both read alike (`_PLAIN_FROM`) is read once, by a regular
    expression: the two parsers cost a tenth of a small message's CPU.
    """
    fields = message.get_all("From")
    if not fields:
        return [], "no From header field"
    if len(fields) > 1:
        return [], f"{len(fields)} From header fields"
    return from_domains(fields[0].unfolded())


def from_domains(value: str) -> tuple[list[str], str]:
    """`author_domains` of one From field's unfolded value."""
    plain = _PLAIN_FROM[0].fullmatch(value) or _PLAIN_FROM[1].fullmatch(value)
    if plain is not None:
        name = ascii_domain(plain.group("domain"))
        if name is None:
            return [], "a From address whose domain is not a DNS domain name"
        return [name], ""
    return two_readers(value)


def two_readers(value: str) -> tuple[list[str], str]:
    """The domains of a From value as either of the two parsers reads it."""
    candidates = [a for _, a in email.utils.getaddresses([value]) if a]
    try:
        parsed = email.policy.default.header_factory("from", value)
        candidates += [f"{a.username}@{a.domain}" for a in parsed.addresses]
    except Exception:  # a parser's bug must not stop the check
        pass
    domains: list[str] = []
    for address in candidates:
        local, at, domain = address.rpartition("@")
        if not (at and local and domain):
            return [], "a From address without a domain"
        name = ascii_domain(domain)
        if name is None:
            return [], "a From address whose domain is not a DNS domain name"
        domains.append(name)
    if not domains:
        return [], "a From field without an address"
    return list(dict.fromkeys(domains)), ""


class DmarcCheck(Check):
    section = ("dmarc", DmarcSettings)
    name = "dmarc"
    stages = frozenset({Stage.EOD})
    replay_needs = "header"  # the From field, and the SPF and DKIM results

    def __init__(self, settings: DmarcSettings, resolver: Resolver) -> None:
        self.settings = settings
        self.resolver = resolver
        self.timeout = settings.timeout + 1.0
        # An exception in this check: the policy is unknown, and may be p=reject.
        self.on_error = "tempfail" if settings.internal_error == "tempfail" else "continue"
        self.sample = random.random  # pct= sampling; a test may fix it
        self.dmarc = dmarclib.DMARC(publicsuffix=_Suffixes())

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: DmarcSettings = config.section("dmarc")
        if not s.enabled:
            return []
        off = [n for n in ("spf", "dkim") if not config.section(n).enabled]
        if off:
            where = config.path or "<config>"
            raise ConfigError(
                [
                    f"{where}: [dmarc] needs [{'] and ['.join(off)}] enabled: DMARC passes "
                    "on either, so judging it without one refuses legitimate mail"
                ]
            )
        public_suffixes()  # load it now, not in the first session
        return [cls(s, services.resolver)]

    def failure(self, kind: str) -> object | None:
        """A bug in this check is an internal error of its own (cause "dmarc")."""
        return InternalError("dmarc") if kind == "exception" else None

    async def check(self, ctx: CheckContext) -> Verdict:
        message, txn = ctx.message, ctx.transaction
        if message is None or txn is None or ctx.session.relay_permitted:
            return DUNNO
        domains, problem = author_domains(message)
        if problem:
            return self._bad_from(DmarcResults(problem=problem))
        spf = txn.results.get(SpfResult)
        dkim = txn.results.get(DkimResults)
        lost = _lost(ctx, message, spf, dkim)
        try:
            async with asyncio.timeout(self.settings.timeout):
                results = await asyncio.gather(
                    *(self._evaluate(d, spf, dkim, lost) for d in domains)
                )
        except TimeoutError:
            why = f"policy lookup took more than {self.settings.timeout:g}s"
            results = [DmarcResult("temperror", d, reason=why) for d in domains]
        return self._verdict(DmarcResults(tuple(results)), txn)

    async def _policy(self, domain: str) -> tuple[str | None, str | None, str]:
        """(record, org domain it was found at or None, problem); the problem is
        "temperror: ..." or "permerror: ..." when the lookup says so."""
        record, problem = await self._record(domain)
        if record is not None or problem:
            return record, None, problem
        org = org_domain(domain)
        if org is None or org == domain:
            return None, None, ""
        record, problem = await self._record(org)
        return record, org, problem

    async def _record(self, domain: str) -> tuple[str | None, str]:
        try:
            answer = await self.resolver.lookup(f"_dmarc.{domain}", "TXT")
        except DnsError as exc:
            return None, f"temperror: {exc}"
        records = [t for t in answer.texts if _VERSION.match(t)]
        if len(records) > 1:
            # RFC 7489 §6.6.3: several records mean no policy at all.
            return None, ""
        return (records[0] if records else None), ""

    async def _evaluate(
        self,
        domain: str,
        spf: SpfResult | None,
        dkim: DkimResults | None,
        lost: list[tuple[str, str]],
    ) -> DmarcResult:
        record, org, problem = await self._policy(domain)
        if problem:
            kind, _, reason = problem.partition(": ")
            return DmarcResult(kind, domain, reason=reason)
        if record is None:
            return DmarcResult("none", domain)
        try:
            policy = self.dmarc.parse_record(record, domain, org_domain=org, strict=False)
        except dmarclib.RecordSyntaxError as exc:
            return DmarcResult("permerror", domain, reason=f"bad policy record: {exc}")
        auth = dmarclib.AuthResults(
            spf=_spf(spf) if spf is not None and _usable(spf.domain) else None,
            dkim=[
                dmarclib.DKIMAuthResult(s.domain, dmarclib.DKIMResult(s.result), s.selector)
                for s in (dkim.signatures if dkim else ())
                if s.result in _DKIM_RESULTS and _usable(s.domain)
            ]
            or None,
        )
        verdict = self.dmarc.get_result(policy, auth_results=auth)
        applied = (
            policy.sp
            if org is not None and policy.sp is not dmarclib.DMARCDisposition.UNSPECIFIED
            else policy.p
        ).value
        spf_ok = verdict.spf is dmarclib.DMARCResult.PASS
        dkim_ok = verdict.dkim is dmarclib.DMARCResult.PASS
        if spf_ok or dkim_ok:
            return DmarcResult("pass", domain, applied, "none", spf_ok, dkim_ok)
        # Evidence we could not get, from an identifier that would have aligned:
        # first because a check of ours failed, then because of the sender's DNS.
        failed = [kind for d, kind in lost if self._aligned(domain, d, policy, kind)]
        if failed:
            what = f"the {failed[0].upper()} check did not finish"
            enforced = self._action(applied) != "continue"
            return DmarcResult(
                "temperror", domain, applied, reason=what, internal=failed[0] if enforced else ""
            )
        unknown = [d for d, kind in _unknown(spf, dkim) if self._aligned(domain, d, policy, kind)]
        if unknown:
            return DmarcResult("temperror", domain, applied, reason=f"{unknown[0]}: temperror")
        disposition = applied
        if self.settings.pct and policy.pct < 100 and self.sample() * 100 >= policy.pct:
            disposition = _MILDER[applied]
        return DmarcResult("fail", domain, applied, disposition)

    def _aligned(self, domain: str, other: str, policy: dmarclib.Policy, kind: str) -> bool:
        """`other` (an SPF or DKIM identifier's domain) aligns with the author domain."""
        return _usable(other) and self.dmarc.check_alignment(
            domain, other, _mode(policy, kind), self.dmarc.publicsuffix
        )

    def _action(self, disposition: str) -> PolicyAction:
        """The configured action for mail failing a policy of this disposition."""
        return {
            "reject": self.settings.p_reject,
            "quarantine": self.settings.p_quarantine,
            "none": self.settings.p_none,
        }[disposition]

    # -- verdicts -----------------------------------------------------------------------

    def _bad_from(self, outcome: DmarcResults) -> Verdict:
        action = self.settings.bad_from
        if action == "reject":
            reply = Reply(
                550,
                "5.7.1",
                (
                    f"Message refused: {outcome.problem}; RFC 5322 requires exactly one From "
                    "address with a domain",
                ),
            )
            return Verdict(Action.REJECT, reply, rule="dmarc:bad_from", result=outcome)
        if action == "score":
            symbol = Symbol("DMARC_BAD_FROM", SCORES["DMARC_BAD_FROM"])
            return Verdict(symbols=(symbol,), result=outcome)
        return Verdict(result=outcome)

    def _verdict(self, outcome: DmarcResults, txn: Transaction) -> Verdict:
        failed = [r for r in outcome.results if r.result == "fail"]
        internal = [r for r in outcome.results if r.internal]
        if internal and self.settings.internal_error == "fail":
            failed += [dataclasses.replace(r, disposition=r.policy) for r in internal]
        elif (
            internal
            and self.settings.internal_error == "tempfail"
            # a definite refusal stands; anything milder waits for a working spamgate
            and (not failed or self._action(_worst(failed).disposition) != "reject")
        ):
            r = internal[0]
            text = (
                f"DMARC policy of {r.domain} (p={r.policy}) could not be applied: "
                f"local error in the {r.internal.upper()} check; try again later"
            )
            return Verdict(
                Action.DEFER,
                Reply(451, "4.3.0", (text,)),
                rule="dmarc:internal_error",
                result=outcome,
                warn=f"{r.reason}, so the DMARC policy of {r.domain} (p={r.policy}) "
                "was not applied: internal_error = tempfail",
            )
        if failed:
            worst = _worst(failed)
            action = self._action(worst.disposition)
            symbol = f"DMARC_{worst.disposition.upper()}"
            rule = f"dmarc:{worst.disposition}"
            if action == "reject":
                text = (
                    f"Unauthenticated mail from {worst.domain} refused by the DMARC "
                    f"policy of {worst.domain} (p={worst.policy})"
                )
                return Verdict(
                    Action.REJECT, Reply(550, "5.7.1", (text,)), rule=rule, result=outcome
                )
            if action == "hold":
                return Verdict(Action.HOLD, rule=rule, result=outcome)
            if action == "score":
                return Verdict(symbols=(Symbol(symbol, SCORES[symbol]),), result=outcome)
            return Verdict(result=outcome)
        if any(r.result == "temperror" for r in outcome.results):
            action = self.settings.temperror
            if action == "tempfail":
                domain = next(r.domain for r in outcome.results if r.result == "temperror")
                text = f"DMARC policy of {domain} could not be evaluated; try again later"
                return Verdict(
                    Action.DEFER,
                    Reply(451, "4.7.1", (text,)),
                    rule="dmarc:temperror",
                    result=outcome,
                )
            if action == "score":
                symbol = Symbol("DMARC_TEMPERROR", SCORES["DMARC_TEMPERROR"])
                return Verdict(symbols=(symbol,), result=outcome)
        return Verdict(result=outcome)


_DKIM_RESULTS = {r.value for r in dmarclib.DKIMResult}


def _worst(failed: list[DmarcResult]) -> DmarcResult:
    return max(failed, key=lambda r: _STRICTNESS[r.disposition])


def _lost(
    ctx: CheckContext, message: Message, spf: SpfResult | None, dkim: DkimResults | None
) -> list[tuple[str, str]]:
    """(domain, "spf"/"dkim") of the identifiers whose check failed inside spamgate:
    the MAIL FROM (or HELO) domain if the SPF check failed; each signature's d= if
    the DKIM check did (a signed message without DKIM results is one)."""
    txn = ctx.transaction
    assert txn is not None
    failures = txn.results.get(CheckFailures) or CheckFailures()
    lost: list[tuple[str, str]] = []
    if "spf" in failures:
        name = txn.sender_domain or (ctx.session.client.helo or "")
        lost.append((ascii_domain(name) or name, "spf"))
    signatures = message.get_all("DKIM-Signature")
    if signatures and ("dkim" in failures or dkim is None):
        for h in signatures:
            d = describe(h.value.encode("utf-8", "surrogateescape")).domain
            lost.append((ascii_domain(d) or d, "dkim"))
    return lost


def _spf(spf: SpfResult) -> dmarclib.SPFAuthResult:
    scope = dmarclib.SPFDomainScope.MFROM
    return dmarclib.SPFAuthResult(spf.domain, dmarclib.SPFResult(spf.result), scope)


def _usable(domain: str) -> bool:
    """A domain that can align with an author domain: a domain, and not a public
    suffix, which is nobody's organisational domain (the dmarc package would align
    d=com with From: example.com in relaxed mode)."""
    return ascii_domain(domain) is not None and org_domain(domain) is not None


def _unknown(spf: SpfResult | None, dkim: DkimResults | None) -> list[tuple[str, str]]:
    """(domain, "spf"/"dkim") of the identifiers whose result was temperror."""
    out = [(spf.domain, "spf")] if spf is not None and spf.result == "temperror" else []
    if dkim is not None:
        out += [(s.domain, "dkim") for s in dkim.signatures if s.result == "temperror"]
    return [(d, kind) for d, kind in out if _usable(d)]


def _mode(policy: dmarclib.Policy, kind: str) -> dmarclib.DMARCAlignment:
    return policy.aspf if kind == "spf" else policy.adkim
