"""Greylisting: defer the first attempt of an unknown (client network, sender, recipient).

Real MTAs queue and retry; much bulk spam software does not. The first RCPT of a
triplet gets `450 4.7.1` and the time is remembered; a retry after `delay` and
within `retry_window` passes, and the triplet is then remembered as passed for
`max_age`. A client network whose triplets passed `auto_allowlist_after` times is
not greylisted any more for `max_age` (it has shown it retries properly).
Greylisting is never applied to trusted clients (mynetworks), to networks in
`allow_clients`, to clients an `allowlist` table says OK for, nor to mail whose
sender domain is one of `spf_pass_domains` and passed SPF: the large providers
retry from pools too wide for any network rule, and an SPF pass proves the mail
comes from their servers.

Clients are taken by network (/24, /64), as postgrey does, because large senders
retry from another address of the same pool; the sender is normalised as postgrey
does (lower case, no +extension, no BATV tag, numbers collapsed) so that VERP
senders do not make every message a new triplet. With a shared store, a retry that
reaches another instance passes too.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.settings import networks, non_negative, positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Action, Verdict
from ..reply import Reply
from ..state import StateStore, StoreUnavailable, Window, network_of
from ..state.base import prefix_check
from ..tables import split_spec
from ..tables.clientset import ClientSet, source_of
from .engines.ruleverdict import lookups
from .engines.unavailable import unavailable_verdict
from .spf import SpfResult

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

DAY = 86400.0

# Large providers whose outbound pools retry from ever other addresses.
WELL_KNOWN = [
    "gmail.com",
    "googlemail.com",
    "outlook.com",
    "hotmail.com",
    "live.com",
    "yahoo.com",
    "icloud.com",
    "me.com",
    "aol.com",
    "gmx.net",
    "gmx.de",
    "web.de",
]


def _specs(value: list[str]) -> str | None:
    for spec in value:
        try:
            split_spec(spec)
        except ValueError as exc:
            return str(exc)
    return None


def _domains(value: list[str]) -> str | None:
    for item in value:
        if not item.strip(".") or " " in item or "@" in item:
            return f'"{item}" is not a domain'
    return None


@dataclass(frozen=True)
class GreylistSettings:
    enabled: bool = setting(False, "Greylist unknown (client network, sender, recipient) triplets.")
    delay: float = setting(
        300.0, "Seconds a new triplet is deferred (450 4.7.1).", check=non_negative
    )
    retry_window: float = setting(
        2 * DAY, "Seconds after the first attempt within which a retry passes.", check=positive
    )
    max_age: float = setting(
        35 * DAY,
        "Seconds a passed triplet or an allowlisted network is remembered.",
        check=positive,
    )
    auto_allowlist_after: int = setting(
        5,
        "Passed triplets after which the client network skips greylisting; 0: never.",
        check=non_negative,
    )
    ipv4_prefix: int = setting(24, "Length of an IPv4 client network.", check=prefix_check(32))
    ipv6_prefix: int = setting(64, "Length of an IPv6 client network.", check=prefix_check(128))
    allow_clients: list[str] = setting(
        [], "Client networks never greylisted (mynetworks never are).", check=networks
    )
    allowlist: list[str] = setting(
        [],
        'Client tables, "type:path" (cidr:, hash:, regexp:): OK skips greylisting, DUNNO not.',
        check=_specs,
    )
    spf_pass_domains: list[str] = setting(
        WELL_KNOWN,
        'Sender domains whose mail skips greylisting when SPF passes ([spf] enabled); ".d" '
        "matches subdomains.",
        check=_domains,
    )


_BATV = re.compile(r"^prvs=[^=]+=", re.IGNORECASE)
_NUMBER = re.compile(r"\b\d+\b")


def normalise_sender(address: str) -> str:
    """The sender as greylisting keys it: one key per list or bounce stream, not per message."""
    local, at, domain = address.lower().rpartition("@")
    if not at:
        return address.lower()
    local = _BATV.sub("", local).split("+", 1)[0]
    return f"{_NUMBER.sub('#', local)}@{domain}"


class GreylistCheck(Check):
    section = ("greylist", GreylistSettings)
    name = "greylist"
    stages = frozenset({Stage.RCPT})

    def __init__(
        self,
        settings: GreylistSettings,
        store: StateStore,
        on_unavailable: str,
        allowlists: list[ClientSet] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_unavailable = on_unavailable
        self.allow_clients = [ipaddress.ip_network(n, strict=False) for n in settings.allow_clients]
        self.allowlists = allowlists or []
        self.spf_exact = {d.lower() for d in settings.spf_pass_domains if not d.startswith(".")}
        self.spf_parents = tuple(d.lower() for d in settings.spf_pass_domains if d.startswith("."))

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: GreylistSettings = config.section("greylist")
        if not s.enabled:
            return []
        lists = [
            ClientSet.load(
                spec,
                config,
                "a greylist allowlist",
                ("greylist", "allowlist"),
                limits=config.section("rules").limits,
                timeout=config.section("rules").timeout,
            )
            for spec in s.allowlist
        ]
        return [cls(s, services.state, config.state.on_unavailable, lists)]

    @classmethod
    def sources(cls, config: Config) -> list[str]:
        s: GreylistSettings = config.section("greylist")
        return [source_of(spec, config) for spec in s.allowlist]

    def _exempt(self, ctx: CheckContext) -> bool:
        if ctx.session.relay_permitted:
            return True
        client = ctx.session.client
        if any(client.address in net for net in self.allow_clients):
            return True
        if any(client in allowlist for allowlist in self.allowlists):
            return True
        return self._spf_pass(ctx)

    def _spf_pass(self, ctx: CheckContext) -> bool:
        spf = ctx.transaction.results.get(SpfResult) if ctx.transaction else None
        if spf is None or spf.result != "pass":
            return False
        domain = spf.domain.lower().rstrip(".")
        return domain in self.spf_exact or domain.endswith(self.spf_parents)

    async def check(self, ctx: CheckContext) -> Verdict:
        assert ctx.transaction is not None and ctx.recipient is not None
        with lookups():
            exempt = self._exempt(ctx)
        if exempt:
            return DUNNO
        s = self.settings
        net = network_of(ctx.session.client.address, s.ipv4_prefix, s.ipv6_prefix)
        sender = normalise_sender(ctx.transaction.mail_from)
        rcpt = ctx.recipient.address.lower()
        triplet = f"{net}/{sender}/{rcpt}"
        allowed, passed = f"gl:a:{net}", f"gl:p:{triplet}"
        try:
            if any(await self.store.marked([allowed, passed])):
                return DUNNO
            age = await self.store.first_seen(f"gl:t:{triplet}", s.retry_window)
            if age < s.delay:
                wait = max(1, math.ceil(s.delay - age))
                text = (
                    f"<{ctx.recipient.address}>: Greylisted, please try again in "
                    f"{wait} second{'' if wait == 1 else 's'}"
                )
                rule = "greylist:new" if age == 0 else "greylist:early"
                return Verdict(Action.DEFER, Reply(450, "4.7.1", (text,)), rule=rule)
            await self.store.mark(passed, s.max_age)
            if s.auto_allowlist_after:
                hit = await self.store.hit([Window(f"gl:n:{net}", s.max_age)])
                if hit.counts[0] >= s.auto_allowlist_after:
                    await self.store.mark(allowed, s.max_age)
        except StoreUnavailable:
            return unavailable_verdict(self.on_unavailable, self.name)
        return DUNNO
