"""SPF (RFC 7208) for the MAIL FROM identity and, at HELO, for the HELO name.

Each result maps to an action in config: refuse (550 5.7.23, with the domain's
explanation when it publishes one; 5.7.24 for errors, RFC 7372), defer (451 4.4.3
for a DNS failure), add a score symbol, or nothing. The defaults follow RFC 7208 §8:
only `fail` is refused; `softfail` and `permerror` are scored; a DNS failure lets the
mail through. The result itself is kept (`SpfResult`, `SpfHeloResult`) for the
Authentication-Results header and DMARC, whatever the action.

The null sender is checked as postmaster@HELO (§2.4). Names that are not domains
(address literals, single labels) give "none" without a lookup (§4.3), and so do
domains with no IDNA 2008 A-label form ("ban\u212a.test", with a Kelvin sign):
they are malformed, and never looked up as the domain they resemble. Clients in
mynetworks are ours, and clients already refused (delayed reject) are past saving:
no SPF check for either.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import spf

from ..config.settings import positive, setting
from ..domains import ascii_lower
from ..model import Client, Stage
from ..pipeline.check import Check, CheckContext, Series
from ..pipeline.verdict import DUNNO, Action, Symbol, Verdict
from ..reply import Reply
from ..resolver import ascii_domain
from .engines.spfquery import SpfEngine, SpfOutcome

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

SpfAction = Literal["continue", "score", "reject", "tempfail"]
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
AUTH_RESULTS = "spamgate_auth_results_total"  # where results are counted, by method

# Scores the symbols suggest; [scoring] symbols overrides them by name.
SCORES = {"fail": 5.0, "softfail": 3.0, "permerror": 1.0}
HELO_SCORES = {"fail": 3.0, "softfail": 1.5, "permerror": 0.5}
_EXPLANATION_MAX = 300


def _results(value: dict[str, str]) -> str | None:
    unknown = [k for k in value if k not in RESULTS]
    if unknown:
        return f'"{unknown[0]}" is not an SPF result ({", ".join(RESULTS)})'
    return None


@dataclass(frozen=True)
class SpfSettings:
    enabled: bool = setting(False, "Check SPF (RFC 7208) for MAIL FROM, and the HELO name.")
    timeout: float = setting(
        20.0,
        "Seconds in all for one SPF evaluation, then temperror (RFC 7208 §4.6.4: 20 or more).",
        check=positive,
    )
    actions: dict[str, SpfAction] = setting(
        {"fail": "reject", "softfail": "score", "permerror": "score"},
        "Action per MAIL FROM result: reject (550 5.7.23, 5.7.24 for errors), tempfail "
        "(451; 4.4.3 for temperror), score (symbol SPF_FAIL 5, SPF_SOFTFAIL 3, "
        "SPF_PERMERROR 1, others 0), continue. Results not listed continue.",
        check=_results,
    )
    helo: bool = setting(True, "Check the HELO name too (RFC 7208 §2.3), at HELO.")
    helo_actions: dict[str, SpfAction] = setting(
        {"fail": "score", "softfail": "score"},
        "Action per HELO result, as for MAIL FROM; symbols SPF_HELO_FAIL 3, "
        "SPF_HELO_SOFTFAIL 1.5, SPF_HELO_PERMERROR 0.5. Results not listed continue.",
        check=_results,
    )


@dataclass(frozen=True)
class SpfResult:
    """An SPF result (RFC 7208 §2.6) for the MAIL FROM identity.

    `sender` is the <sender> given to check_host(): the MAIL FROM address, or
    postmaster@HELO for the null sender; `domain` is its domain. `explanation` is
    the domain's own text (exp=) for a fail; `detail` says what went wrong for
    temperror and permerror.
    """

    result: str
    domain: str
    sender: str
    client: str
    helo: str
    explanation: str = ""
    detail: str = ""
    identity: ClassVar[str] = "mailfrom"
    method: ClassVar[str] = "spf"  # the metric's method label

    def counted(self) -> Iterable[Series]:
        """The result, in spamgate_auth_results_total (method spf or spf_helo)."""
        yield AUTH_RESULTS, (self.method, self.result)

    @property
    def smtp_property(self) -> str:
        """The RFC 8601 property for Authentication-Results: smtp.mailfrom, smtp.helo."""
        return f"smtp.{self.identity}"


@dataclass(frozen=True)
class SpfHeloResult(SpfResult):
    """An SPF result for the HELO identity (RFC 7208 §2.3), kept for the session."""

    identity: ClassVar[str] = "helo"
    method: ClassVar[str] = "spf_helo"


class SpfCheck(Check):
    section = ("spf", SpfSettings)
    name = "spf"

    def __init__(self, settings: SpfSettings, engine: SpfEngine) -> None:
        self.settings = settings
        self.engine = engine
        stages = {Stage.HELO, Stage.MAIL} if settings.helo else {Stage.MAIL}
        self.stages = frozenset(stages)  # type: ignore[misc]
        self.timeout = settings.timeout + 1.0  # the runner's backstop; the engine keeps time

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: SpfSettings = config.section("spf")
        if not s.enabled:
            return []
        return [cls(s, SpfEngine(services.resolver, services.threads, s.timeout))]

    async def check(self, ctx: CheckContext) -> Verdict:
        if ctx.session.relay_permitted or ctx.held is not None:
            # ours, or already refused (delayed reject): no lookups to make
            return DUNNO
        client = ctx.session.client
        helo = client.helo or ""
        if ctx.stage is Stage.HELO:
            kind: type[SpfResult] = SpfHeloResult
            sender, actions, scores = "", self.settings.helo_actions, HELO_SCORES
        else:
            assert ctx.transaction is not None
            kind = SpfResult
            sender, actions, scores = ctx.transaction.mail_from, self.settings.actions, SCORES
        outcome = await self.engine.check(str(client.address), sender, helo)
        domain = (sender or f"postmaster@{helo}").rpartition("@")[2]
        result = _result(
            kind, outcome, ascii_domain(domain) or ascii_lower(domain), sender, client, helo
        )
        return _verdict(result, actions.get(result.result, "continue"), scores)


def _result(
    kind: type[SpfResult], outcome: SpfOutcome, domain: str, sender: str, client: Client, helo: str
) -> SpfResult:
    explanation = detail = ""
    if outcome.result in ("temperror", "permerror"):
        detail = outcome.explanation
        for prefix in ("SPF Permanent Error: ", "SPF Temporary Error: "):
            detail = detail.removeprefix(prefix)
    elif outcome.explanation != spf.EXPLANATIONS.get(outcome.result, ""):
        explanation = outcome.explanation  # the domain's own (exp=)
    return kind(
        result=outcome.result,
        domain=domain,
        sender=sender or f"postmaster@{helo}",
        client=str(client.address),
        helo=helo,
        explanation=explanation[:_EXPLANATION_MAX],
        detail=detail,
    )


def _verdict(result: SpfResult, action: str, scores: dict[str, float]) -> Verdict:
    prefix = "SPF_HELO" if result.identity == "helo" else "SPF"
    if action == "score":
        symbol = Symbol(f"{prefix}_{result.result.upper()}", scores.get(result.result, 0.0))
        return Verdict(symbols=(symbol,), result=result)
    if action not in ("reject", "tempfail"):
        return Verdict(result=result)
    what = "HELO" if result.identity == "helo" else "MAIL FROM"
    if result.explanation:  # RFC 7208 §8.4's example reply
        text = f"SPF {what} check failed: The domain {result.domain} explains: {result.explanation}"
    elif result.detail:
        text = f"SPF {what} check of {result.domain}: {result.result} ({result.detail})"
    elif result.result == "fail":
        text = f"SPF {what} check failed: {result.domain} does not authorize [{result.client}]"
    else:
        text = f"SPF {what} check of {result.domain}: {result.result}"
    if action == "reject":
        kind, code = Action.REJECT, 550
        enhanced = "5.7.24" if result.result.endswith("error") else "5.7.23"
    else:
        kind, code = Action.DEFER, 451
        enhanced = {"temperror": "4.4.3", "permerror": "4.7.24"}.get(result.result, "4.7.23")
        text += "; try again later"
    return Verdict(
        kind,
        Reply.make(code, text, enhanced),
        rule=f"{prefix.lower()}:{result.result}",
        result=result,
    )
