"""DNS blocklists and allowlists for the client address, at connect (postscreen-style).

All zones are asked at once. Listing `sites` add their weights (negative for
allowlists) and a total at or above `threshold` refuses the client, naming the
heaviest listing zone and its TXT reason; `symbols` only add to the score. Errors,
including a list's "refused" codes, are counted and logged and never refuse mail.
Clients in mynetworks are ours and are not looked up, as with Postfix's
`permit_mynetworks` placed before `reject_rbl_client`; nor are clients the
reputation memory knows as good (`ReputationResult`, [reputation] good_ttl), as
postscreen skips its tests for clients in its cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.settings import positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Verdict
from .engines.dnslist import ListPolicy, ListResult, check_sites, check_symbol_sites, ip_query
from .reputation import ReputationResult

if TYPE_CHECKING:
    from ..config import Config
    from ..resolver import Resolver
    from ..services import Services


@dataclass(frozen=True)
class DnsblSettings:
    sites: list[str] = setting(
        [],
        'Lists for the client address, "zone[=filter][*weight]" (postscreen syntax); '
        "weights of listing sites add up, negative ones allowlist.",
        check=check_sites,
    )
    threshold: float = setting(
        1.0, "Total weight at or above which the client is refused (554 5.7.1).", check=positive
    )
    symbols: dict[str, str] = setting(
        {},
        'Score-only lists: symbol name = "zone[=filter][*score]"; a listing adds the symbol.',
        check=check_symbol_sites,
    )


@dataclass(frozen=True)
class DnsblResult(ListResult):
    """The client address's listings, kept for the session."""


class DnsblCheck(Check):
    section = ("dnsbl", DnsblSettings)
    name = "dnsbl"
    stages = frozenset({Stage.CONNECT})

    def __init__(self, policy: ListPolicy, resolver: Resolver) -> None:
        self.policy = policy
        self.resolver = resolver
        self.timeout = resolver.lifetime + 1.0  # the runner's backstop; lookups are bounded

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: DnsblSettings = config.section("dnsbl")
        policy = ListPolicy.build(s.sites, s.threshold, s.symbols)
        return [cls(policy, services.resolver)] if policy.enabled else []

    def metric_series(self):
        """Each zone's result series, at zero from the start (see Check.metric_series)."""
        return self.policy.metric_series()

    async def check(self, ctx: CheckContext) -> Verdict:
        if ctx.session.relay_permitted:
            return DUNNO
        known = ctx.session.results.get(ReputationResult)
        if known is not None and known.known_good:
            return DUNNO
        address = ctx.session.client.address
        return await self.policy.verdict(
            self.resolver,
            {zone: ip_query(address, zone) for zone in self.policy.zones},
            subject=str(address),
            who="client",
            kind=DnsblResult,
            check=self.name,
        )
