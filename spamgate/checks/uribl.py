"""Links against domain lists (URIBL / DBL style), at end of data.

The hosts of every link in the message's text and HTML parts (`engines/links.py`
says how they are found and normalised) are looked up by their registered domain
in DBL-style zones, with the same `zone[=filter][*weight]` syntax, weights,
threshold, score-only `symbols` and error handling as `[dnsbl]` (`engines/dnslist.py`):
an answer a list gives to say "I refuse" is counted as an error, never as a
listing. Links to IP addresses go to `ip_sites`, address lists such as zen.

Bounded per message: at most `max_links` link strings are examined and at most
`max_domains` distinct domains looked up, those in `href` attributes first, then
redirect targets, mail addresses, `src`, and bare text. Domains in the allowlist
(the admin's relay_domains, the `allow` list and `allow_file`; a name matches
itself and its subdomains) are never looked up. All lookups go out at once
through the shared resolver (cached, de-duplicated) and the check runs beside
the other end-of-data checks (`concurrent`). The only network access is DNS.

A link's host is mapped as a browser maps it (UTS 46, `links.py`), unlike the
sender's domains, which are held to IDNA 2008 as written (`domains.py`): a link
to "ban\u212a.test" (Kelvin sign) takes its reader to bank.test, so bank.test is
the domain looked up, while mail *from* that look-alike is not judged as
bank.test's. The allowlist is the admin's, read with the same mapping.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..config.settings import ConfigError, display_path, positive, setting, unreadable
from ..message import Message
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Action, Symbol, Verdict
from ..reply import Reply
from ..resolver import Resolver, ascii_domain
from .engines.dnslist import (
    ListPolicy,
    ZoneAnswer,
    check_sites,
    check_symbol_sites,
    counted_answers,
    describe_errors,
    domain_query,
    ip_query,
    txt_reason,
)
from .engines.links import Extractor, Link, ordered
from .engines.mimewalk import WalkLimits, walk

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

# Larger messages are read and parsed in a worker thread (HTML parsing releases
# the GIL), so the event loop keeps serving other sessions meanwhile.
INLINE_LIMIT = 16384

# Domains that appear in a great deal of legitimate mail and that no domain list
# lists as such: looking them up costs queries and finds nothing.
DEFAULT_ALLOW = [
    "w3.org",
    "schema.org",
    "google.com",
    "gstatic.com",
    "googleapis.com",
    "microsoft.com",
    "outlook.com",
    "office.com",
    "apple.com",
    "icloud.com",
    "yahoo.com",
    "amazon.com",
    "facebook.com",
    "linkedin.com",
    "youtube.com",
]


def _domains(value: list[str]) -> str | None:
    for item in value:
        if ascii_domain(item.lstrip("."), lenient=True) is None:
            return f'"{item}" is not a domain'
    return None


@dataclass(frozen=True)
class UriblSettings:
    sites: list[str] = setting(
        [],
        'Domain lists for the links\' registered domains, "zone[=filter][*weight]" '
        '(postscreen syntax, e.g. "dbl.example=127.0.1.[2..99]"); weights of listing '
        "sites add up for each domain.",
        check=check_sites,
    )
    threshold: float = setting(
        1.0,
        "Total weight (for one domain) at or above which the message is refused (554 5.7.1).",
        check=positive,
    )
    symbols: dict[str, str] = setting(
        {},
        'Score-only domain lists: symbol name = "zone[=filter][*score]"; added once '
        "per message when any link domain is listed.",
        check=check_symbol_sites,
    )
    ip_sites: list[str] = setting(
        [], "Address lists for links to IP addresses, as sites.", check=check_sites
    )
    ip_symbols: dict[str, str] = setting(
        {}, "Score-only address lists for links to IP addresses.", check=check_symbol_sites
    )
    max_domains: int = setting(
        20,
        "Distinct link domains (and addresses) looked up per message; href links first.",
        check=positive,
    )
    max_links: int = setting(
        1000, "Link strings examined per message; the rest are ignored.", check=positive
    )
    allow: list[str] = setting(
        DEFAULT_ALLOW,
        "Domains never looked up (and their subdomains), besides [server] relay_domains.",
        check=_domains,
    )
    allow_file: str = setting(
        "",
        "A file of more domains never looked up, one per line (# comments); relative "
        "to this file; a change reloads.",
    )
    scan_size: int = setting(
        1048576, "Bytes of a message read for links; the rest is not read.", check=positive
    )
    part_size: int = setting(
        51200, "Decoded bytes of each text or HTML part searched for links.", check=positive
    )
    parts: int = setting(100, "MIME parts looked at.", check=positive)
    on_error: Literal["continue", "tempfail"] = setting(
        "continue",
        'The check failing as a whole (time-out): "continue" or "tempfail" (451); a '
        "list's own errors never refuse mail.",
    )


@dataclass(frozen=True)
class LinkAnswer:
    """What the lists said about one looked-up link domain or address."""

    key: str  # registered domain, or IP address
    source: str
    hosts: tuple[str, ...]  # the hosts found under this key
    answers: tuple[ZoneAnswer, ...]
    weight: float = 0.0

    @property
    def listed(self) -> tuple[str, ...]:
        return tuple(a.zone for a in self.answers if a.status == "listed")


@dataclass(frozen=True)
class UriblResult:
    """The links of one message and the lists' answers, for explain and the log."""

    links: tuple[Link, ...] = ()
    looked_up: tuple[LinkAnswer, ...] = ()
    allowlisted: tuple[str, ...] = ()
    over_limit: tuple[str, ...] = ()
    truncated: str = ""  # a bound that was reached
    refused_by: str | None = None  # "domain via zone"
    symbols: tuple[str, ...] = field(default_factory=tuple)

    def counted(self):
        if not self.links:
            outcome = "no_links"
        elif self.refused_by or self.symbols or any(a.listed for a in self.looked_up):
            outcome = "listed"
        else:
            outcome = "clean"
        yield "spamgate_content_scans_total", ("uribl", outcome)
        for answer in self.looked_up:
            yield from counted_answers(answer.answers)
        for what, n in (
            ("looked_up", len(self.looked_up)),
            ("allowlisted", len(self.allowlisted)),
            ("over_limit", len(self.over_limit)),
        ):
            for _ in range(n):
                yield "spamgate_uribl_domains_total", (what,)

    def explain(self) -> list[str]:
        """Lines for `spamgate explain`: each link domain and what each list said."""
        out = [
            f"links: {len(self.links)} hosts found"
            + (f" ({self.truncated})" if self.truncated else "")
        ]
        for a in self.looked_up:
            said = ", ".join(
                f"{z.zone} {z.status}" + (f" {'/'.join(z.codes)}" if z.codes else "")
                for z in a.answers
            )
            out.append(f"{a.key} ({a.source}: {', '.join(a.hosts[:3])}): {said or 'no list'}")
        if self.allowlisted:
            out.append("allowlisted, not looked up: " + ", ".join(self.allowlisted[:10]))
        if self.over_limit:
            out.append("past max_domains, not looked up: " + ", ".join(self.over_limit[:10]))
        return out


def _read_allow_file(config: Config, configured: str) -> list[str]:
    """The domains of `[uribl] allow_file`; a file that cannot be read is reported
    at that line of the configuration, a bad line at its own line of the file."""
    shown = display_path(config.resolve_path(configured))
    try:
        with open(config.resolve_path(configured), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = unreadable(exc) if isinstance(exc, OSError) else "not UTF-8 text"
        text = f"[uribl] allow_file: {shown}: {why}"
        raise ConfigError([config.where().at("uribl", "allow_file", text)]) from None
    out, problems = [], []
    for n, line in enumerate(lines, 1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        name = ascii_domain(item.lstrip("."), lenient=True)
        if name is None:
            problems.append(f'{shown}:{n}: "{item}" is not a domain')
        else:
            out.append(name)
    if problems:
        raise ConfigError(problems)
    return out


class UriblCheck(Check):
    section = ("uribl", UriblSettings)
    name = "uribl"
    stages = frozenset({Stage.EOD})
    concurrent = True

    def __init__(
        self,
        settings: UriblSettings,
        domains: ListPolicy,
        addresses: ListPolicy,
        allow: frozenset[str],
        resolver: Resolver,
    ) -> None:
        self.settings = settings
        self.domains = domains
        self.addresses = addresses
        self.allow = allow
        self.resolver = resolver
        self.on_error = settings.on_error
        # the runner's backstop: parsing, then lookups bounded by the resolver's lifetime
        self.timeout = resolver.lifetime + 5.0
        self.limits = WalkLimits(
            scan_size=settings.scan_size, parts=settings.parts, text_size=settings.part_size
        )

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: UriblSettings = config.section("uribl")
        domains = ListPolicy.build(s.sites, s.threshold, s.symbols)
        addresses = ListPolicy.build(s.ip_sites, s.threshold, s.ip_symbols)
        if not (domains.enabled or addresses.enabled):
            return []
        allow = [a.lstrip(".") for a in (*s.allow, *config.server.relay_domains)]
        if s.allow_file:
            allow += _read_allow_file(config, s.allow_file)
        names = frozenset(n for a in allow if (n := ascii_domain(a, lenient=True)) is not None)
        return [cls(s, domains, addresses, names, services.resolver)]

    @classmethod
    def sources(cls, config: Config) -> list[str]:
        s: UriblSettings = config.section("uribl")
        return [config.resolve_path(s.allow_file)] if s.allow_file else []

    def metric_series(self):
        yield from self.domains.metric_series()
        yield from self.addresses.metric_series()
        for outcome in ("clean", "listed", "no_links"):
            yield "spamgate_content_scans_total", ("uribl", outcome)

    def allowed(self, host: str) -> bool:
        labels = host.split(".")
        return any(".".join(labels[i:]) in self.allow for i in range(len(labels) - 1))

    def links(self, message: Message) -> tuple[list[Link], str]:
        """The message's links, and the bound reached if any (blocks: see walk)."""
        found = walk(message, self.limits)
        ex = Extractor(self.settings.max_links)
        for part in found.parts:
            if not part.is_text or ex.full:
                continue
            text = part.text()
            if part.content_type == "text/html":
                ex.html(text)
            else:
                ex.text(text)
        truncated = found.why
        if ex.found.truncated:
            truncated = truncated or f"more than {self.settings.max_links} links"
        return ex.found.links, truncated

    async def check(self, ctx: CheckContext) -> Verdict:
        message = ctx.message
        if message is None or ctx.session.relay_permitted:
            return DUNNO
        if message.size > INLINE_LIMIT or message.path is not None:
            links, truncated = await asyncio.to_thread(self.links, message)
        else:
            links, truncated = self.links(message)
        return await self.judge(links, truncated)

    async def judge(self, links: list[Link], truncated: str = "") -> Verdict:
        """Look the links up and decide (also what the bench measures)."""
        deadline = time.monotonic() + self.resolver.lifetime
        keys: dict[str, list[Link]] = {}
        allowlisted: list[str] = []
        for link in ordered(links):
            key = link.domain if link.domain is not None else link.host
            if link.ip is None and self.allowed(link.host):
                if key not in allowlisted:
                    allowlisted.append(key)
                continue
            keys.setdefault(key, []).append(link)
        chosen = list(keys)[: self.settings.max_domains]
        over = list(keys)[self.settings.max_domains :]
        asked = await asyncio.gather(*(self._ask(keys[k]) for k in chosen))
        answers = [a for a in asked if a is not None]
        verdict = await self._decide(answers, deadline)
        result = UriblResult(
            links=tuple(links),
            looked_up=tuple(a[0] for a in answers),
            allowlisted=tuple(allowlisted),
            over_limit=tuple(over),
            truncated=truncated,
            refused_by=verdict.rule,
            symbols=tuple(s.name for s in verdict.symbols),
        )
        return Verdict(
            verdict.action,
            verdict.reply,
            symbols=verdict.symbols,
            warn=verdict.warn,
            rule=verdict.rule,
            result=result,
        )

    async def _ask(self, links: list[Link]) -> tuple[LinkAnswer, ListPolicy, dict] | None:
        first = links[0]
        if first.ip is not None:
            policy = self.addresses
            queries = {z: ip_query(first.ip, z) for z in policy.zones}
            key = first.host
        else:
            policy = self.domains
            assert first.domain is not None
            key = first.domain
            queries = {z: q for z in policy.zones if (q := domain_query(key, z))}
        if not queries:
            return None
        found = await policy.query(self.resolver, queries, self.resolver.lifetime)
        weight, _, _ = policy.decide(found)
        hosts = tuple(dict.fromkeys(link.host for link in links))
        answer = LinkAnswer(key, first.source, hosts, tuple(found.values()), weight)
        return answer, policy, {"answers": found, "queries": queries}

    async def _decide(
        self, asked: list[tuple[LinkAnswer, ListPolicy, dict]], deadline: float
    ) -> Verdict:
        symbols: dict[str, Symbol] = {}
        refusal: tuple[LinkAnswer, str, str] | None = None
        errors = []
        for answer, policy, extra in asked:
            weight, named, fired = policy.decide(extra["answers"])
            by_name = dict(policy.symbols)
            for name in fired:
                symbols.setdefault(name, Symbol(name, by_name[name].weight))
            errors.extend(a for a in answer.answers if a.status == "error")
            if named is not None and (refusal is None or weight > refusal[0].weight):
                refusal = (answer, named.zone, extra["queries"][named.zone])
        warn = describe_errors(errors)
        if refusal is None:
            return Verdict(symbols=tuple(symbols.values()), warn=warn)
        answer, zone, query = refusal
        what = "address" if _is_ip(answer.key) else "domain"
        reason = await txt_reason(self.resolver, query, deadline - time.monotonic())
        text = f"Message refused: link to {what} [{answer.key}] blocked using {zone}"
        if reason:
            text += f"; {reason}"
        return Verdict(
            Action.REJECT,
            Reply.make(554, text, "5.7.1"),
            symbols=tuple(symbols.values()),
            warn=warn,
            rule=f"uribl:{zone}",
        )


def _is_ip(text: str) -> bool:
    return ":" in text or text.replace(".", "").isdigit()
