"""Domain lists (RHSBL, Spamhaus DBL style) for the HELO name and the sender domain.

The same site syntax, weights, threshold and error handling as the address lists
(`engines/dnslist.py`), applied to each identity on its own: the HELO name at HELO, the MAIL
FROM domain at MAIL. The domain is looked up as given (`domain.zone`, RFC 5782
§2.3); names that are not domains (address literals, single labels) are skipped,
and so are clients in mynetworks and clients already refused (delayed reject).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.settings import positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Verdict
from .engines.dnslist import ListPolicy, ListResult, check_sites, check_symbol_sites, domain_query

if TYPE_CHECKING:
    from ..config import Config
    from ..resolver import Resolver
    from ..services import Services


@dataclass(frozen=True)
class RhsblSettings:
    sites: list[str] = setting(
        [],
        'Domain lists, "zone[=filter][*weight]"; weights of listing sites add up '
        "(for each identity), negative ones allowlist.",
        check=check_sites,
    )
    threshold: float = setting(
        1.0, "Total weight at or above which the domain is refused (554 5.7.1).", check=positive
    )
    symbols: dict[str, str] = setting(
        {},
        'Score-only lists: symbol name = "zone[=filter][*score]"; a listing adds the '
        "symbol with _HELO or _FROM appended.",
        check=check_symbol_sites,
    )
    helo: bool = setting(True, "Look up the HELO name.")
    mail_from: bool = setting(True, "Look up the MAIL FROM domain.")


@dataclass(frozen=True)
class HeloListResult(ListResult):
    """The HELO name's listings, kept for the session."""


@dataclass(frozen=True)
class SenderListResult(ListResult):
    """The MAIL FROM domain's listings, kept for the transaction."""


class RhsblCheck(Check):
    section = ("rhsbl", RhsblSettings)
    name = "rhsbl"
    stages = frozenset({Stage.HELO, Stage.MAIL})

    def __init__(self, policy: ListPolicy, resolver: Resolver, stages: frozenset[Stage]) -> None:
        self.policy = policy
        self.resolver = resolver
        self.stages = stages  # type: ignore[misc]  # the identities configured
        self.timeout = resolver.lifetime + 1.0  # the runner's backstop; lookups are bounded

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: RhsblSettings = config.section("rhsbl")
        policy = ListPolicy.build(s.sites, s.threshold, s.symbols)
        stages = frozenset(
            stage for stage, on in ((Stage.HELO, s.helo), (Stage.MAIL, s.mail_from)) if on
        )
        return [cls(policy, services.resolver, stages)] if policy.enabled and stages else []

    def metric_series(self):
        """Each zone's result series, at zero from the start (see Check.metric_series)."""
        return self.policy.metric_series()

    async def check(self, ctx: CheckContext) -> Verdict:
        if ctx.session.relay_permitted or ctx.held is not None:
            # ours, or already refused (delayed reject): no lookups to make
            return DUNNO
        if ctx.stage is Stage.HELO:
            subject, who, suffix = ctx.session.client.helo or "", "HELO name", "HELO"
            kind: type[ListResult] = HeloListResult
        else:
            txn = ctx.transaction
            subject, who, suffix = txn.sender_domain if txn else "", "sender domain", "FROM"
            kind = SenderListResult
        queries = {z: q for z in self.policy.zones if (q := domain_query(subject, z))}
        if not queries:
            return DUNNO
        return await self.policy.verdict(
            self.resolver,
            queries,
            subject=subject,
            who=who,
            kind=kind,
            check=self.name,
            suffix=suffix,
        )
