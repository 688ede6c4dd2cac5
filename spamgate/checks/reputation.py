"""Reputation memory: what recent sessions from a client IP taught us.

Two optional, bounded memories, shared through the state store:

* a client whose transactions were rejected `reject_limit` times within
  `reject_window` is refused at connect (421 4.7.0) for `block_time`: like
  postscreen's temporary cache, inverted, it saves the checks and the upstream
  the work of refusing the same client again and again;
* a client whose mail was accepted (and not tagged as spam) is remembered as
  known good for `good_ttl`, and the connect stage records
  `ReputationResult(known_good=True)` so that the DNS blocklist check can skip
  its round trip, as postscreen skips tests for clients in its cache.

The memories are learned from outcomes the flow reports (`TransactionObserver`),
off the reply path. Only spamgate's own rejections count (not the upstream's, not
temporary failures such as greylisting), and trusted clients are never judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.settings import non_negative, positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext, TransactionEnd, TransactionObserver
from ..pipeline.verdict import DUNNO, Action, Verdict
from ..reply import Reply
from ..state import StateStore, StoreUnavailable, Window
from .engines.unavailable import unavailable_verdict

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services


@dataclass(frozen=True, slots=True)
class ReputationResult:
    """Recorded at connect for later checks: `results.get(ReputationResult)`."""

    known_good: bool


@dataclass(frozen=True)
class ReputationSettings:
    reject_limit: int = setting(
        0,
        "Rejected transactions after which a client IP is refused at connect (421 4.7.0); 0: off.",
        check=non_negative,
    )
    reject_window: float = setting(600.0, "Seconds over which rejections count.", check=positive)
    block_time: float = setting(
        900.0, "Seconds a client over reject_limit is refused at connect.", check=positive
    )
    good_ttl: float = setting(
        0.0,
        "Seconds a client whose mail was accepted stays known good (skips DNSBL); 0: off.",
        check=non_negative,
    )


class ReputationCheck(Check, TransactionObserver):
    section = ("reputation", ReputationSettings)
    name = "reputation"
    stages = frozenset({Stage.CONNECT})

    def __init__(
        self, settings: ReputationSettings, store: StateStore, on_unavailable: str, tag: float
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_unavailable = on_unavailable
        self.tag = tag  # [scoring] tag: mail at or above it does not make a client good

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: ReputationSettings = config.section("reputation")
        if not s.reject_limit and not s.good_ttl:
            return []
        return [cls(s, services.state, config.state.on_unavailable, config.scoring.tag)]

    @staticmethod
    def _keys(address: object) -> tuple[str, str, str]:
        return f"rep:bad:{address}", f"rep:block:{address}", f"rep:good:{address}"

    async def check(self, ctx: CheckContext) -> Verdict:
        if ctx.session.relay_permitted:
            return DUNNO
        address = ctx.session.client.address
        _, block, good = self._keys(address)
        try:
            blocked, known_good = await self.store.marked([block, good])
        except StoreUnavailable:
            return unavailable_verdict(self.on_unavailable, self.name)
        if blocked and self.settings.reject_limit:
            text = f"Error: too many rejected messages from {address}, try again later"
            return Verdict(
                Action.DISCONNECT, Reply(421, "4.7.0", (text,)), rule="reputation:rejected"
            )
        if known_good and self.settings.good_ttl:
            return Verdict(result=ReputationResult(known_good=True))
        return DUNNO

    def _tagged(self, score: float) -> bool:
        return bool(self.tag) and score >= self.tag

    async def on_transaction_end(self, event: TransactionEnd) -> None:
        if event.trusted:
            return
        s = self.settings
        bad, block, good = self._keys(event.client)
        try:
            if event.outcome == "rejected":
                if s.good_ttl:
                    await self.store.unmark([good])
                if s.reject_limit:
                    hit = await self.store.hit([Window(bad, s.reject_window)])
                    if hit.counts[0] >= s.reject_limit:
                        await self.store.mark(block, s.block_time)
            elif event.outcome == "accepted" and s.good_ttl and not self._tagged(event.score):
                await self.store.mark(good, s.good_ttl)
        except StoreUnavailable:
            return  # the store logged and counted it; this lesson is lost
