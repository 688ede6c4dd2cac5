"""Rate limits per client IP, client network, sender domain and recipient.

Counting follows Postfix's anvil: what is counted is each request a client makes
(a connection, a recipient, a message), whether or not the mail is accepted in
the end, so a spammer whose mail is refused still uses up its quota. A request
over a limit is refused and counted nowhere, so a client that keeps trying gets
exactly its quota and no more, and all limits of one request are tested and
counted in one atomic store operation (`StateStore.hit`): with Redis, a quota is
shared by every instance and concurrent sessions cannot both take its last unit.

Where each is counted: connections at connect (421 4.7.0, then close);
recipients and messages-per-recipient at each RCPT (450 4.7.1); messages at the
DATA command, when the envelope is complete and has an accepted recipient
(450 4.7.1). Windows slide (see `state.base.SLOTS`). Clients in mynetworks are
exempt by default, as in Postfix (smtpd_client_event_limit_exceptions).

Some clients get other limits (a partner gets more): `overrides` maps client
tables (`OK` = one of them, see `tables.clientset`) to the limits their clients
get instead; the first table that says OK for a client decides.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.settings import setting
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

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class Limit:
    count: int
    seconds: float

    def __str__(self) -> str:
        return f"{self.count}/{self.seconds:g}s"


def parse_limit(text: str) -> Limit | None:
    """ "30/1m" (30 per minute), "100/h", "5/30s"; "" means no limit. ValueError if bad."""
    if not text.strip():
        return None
    m = _LIMIT.match(text)
    if not m:
        raise ValueError(f'"{text}" is not "COUNT/PERIOD" like "30/1m", "100/1h" or "5/30s"')
    seconds = float(m.group(2) or 1) * _UNITS[m.group(3)]
    if seconds <= 0:
        raise ValueError(f'"{text}": the period must be longer than 0')
    return Limit(int(m.group(1)), seconds)


def _limit(value: str) -> str | None:
    try:
        parse_limit(value)
    except ValueError as exc:
        return str(exc)
    return None


def _override_specs(value: dict[str, str]) -> str | None:
    for spec, limits in value.items():
        try:
            split_spec(spec)
            parse_overrides(limits)
        except ValueError as exc:
            return f'"{spec}": {exc}'
    return None


def _doc(what: str, where: str) -> str:
    return f"{what}; empty: no limit. {where}"


@dataclass(frozen=True)
class RateLimitSettings:
    connections_per_ip: str = setting(
        "",
        _doc(
            'Connections per client IP, "COUNT/PERIOD" ("30/1m", "1000/1h"; s, m, h, d)',
            "421 4.7.0 at connect.",
        ),
        check=_limit,
    )
    connections_per_net: str = setting(
        "", _doc("Connections per client network", "421 4.7.0 at connect."), check=_limit
    )
    messages_per_ip: str = setting(
        "", _doc("Messages per client IP", "450 4.7.1 at DATA."), check=_limit
    )
    messages_per_net: str = setting(
        "", _doc("Messages per client network", "450 4.7.1 at DATA."), check=_limit
    )
    messages_per_sender_domain: str = setting(
        "",
        _doc(
            "Messages per MAIL FROM domain (as claimed: a forger can use up a domain's quota)",
            "450 4.7.1 at DATA.",
        ),
        check=_limit,
    )
    recipients_per_ip: str = setting(
        "", _doc("Recipients per client IP", "450 4.7.1 at RCPT."), check=_limit
    )
    recipients_per_net: str = setting(
        "", _doc("Recipients per client network", "450 4.7.1 at RCPT."), check=_limit
    )
    recipients_per_sender_domain: str = setting(
        "", _doc("Recipients per MAIL FROM domain", "450 4.7.1 at RCPT."), check=_limit
    )
    messages_per_recipient: str = setting(
        "", _doc("Messages to one recipient address", "450 4.7.1 at RCPT."), check=_limit
    )
    ipv4_prefix: int = setting(24, "Length of an IPv4 client network.", check=prefix_check(32))
    ipv6_prefix: int = setting(64, "Length of an IPv6 client network.", check=prefix_check(128))
    exempt_mynetworks: bool = setting(True, "Clients in [server] mynetworks are not limited.")
    overrides: dict[str, str] = setting(
        {},
        'Client table "type:path" = the limits of the clients it says OK for, e.g. '
        '"messages_per_ip=10000/1h, recipients_per_ip=off" or "unlimited"; first OK wins.',
        check=_override_specs,
    )


@dataclass(frozen=True, slots=True)
class _Kind:
    stage: Stage
    subject: str  # ip, net, sender_domain, recipient
    what: str  # connections, messages, recipients


KINDS: dict[str, _Kind] = {
    "connections_per_ip": _Kind(Stage.CONNECT, "ip", "connections"),
    "connections_per_net": _Kind(Stage.CONNECT, "net", "connections"),
    "recipients_per_ip": _Kind(Stage.RCPT, "ip", "recipients"),
    "recipients_per_net": _Kind(Stage.RCPT, "net", "recipients"),
    "recipients_per_sender_domain": _Kind(Stage.RCPT, "sender_domain", "recipients"),
    "messages_per_recipient": _Kind(Stage.RCPT, "recipient", "messages"),
    "messages_per_ip": _Kind(Stage.DATA, "ip", "messages"),
    "messages_per_net": _Kind(Stage.DATA, "net", "messages"),
    "messages_per_sender_domain": _Kind(Stage.DATA, "sender_domain", "messages"),
}

# Per-client limits, e.g. from a rule table: the limits in force for one client
# (name -> Limit, or None to lift that limit), or None to use the configured ones.
Overrides = Callable[[CheckContext], dict[str, Limit | None] | None]


def parse_overrides(text: str) -> dict[str, Limit | None]:
    """The limits one client gets instead of the configured ones, as a table value.

    `messages_per_ip=10000/1h, recipients_per_ip=off` raises one limit and lifts
    another; `unlimited` lifts them all. Limits not named stay as configured.
    ValueError with a readable reason, for a `file:line` error.
    """
    words = text.replace(",", " ").split()
    if not words:
        raise ValueError("no limits given (name=COUNT/PERIOD, name=off, or unlimited)")
    if [w.lower() for w in words] == ["unlimited"]:
        return dict.fromkeys(KINDS)
    out: dict[str, Limit | None] = {}
    for word in words:
        name, eq, value = word.partition("=")
        if not eq:
            raise ValueError(f"'{word}' is not name=COUNT/PERIOD, name=off or unlimited")
        if name not in KINDS:
            raise ValueError(f"'{name}' is not a rate limit ({', '.join(KINDS)})")
        if name in out:
            raise ValueError(f"'{name}' is given twice")
        out[name] = None if value.lower() == "off" else parse_limit(value)
        if out[name] is None and value.lower() != "off":
            raise ValueError(f"'{word}': give a limit or off")
    return out


def _by_tables(classes: list[tuple[ClientSet, dict[str, Limit | None]]]) -> Overrides:
    def overrides(ctx: CheckContext) -> dict[str, Limit | None] | None:
        client = ctx.session.client
        return next((limits for clients, limits in classes if client in clients), None)

    return overrides


class RateLimitCheck(Check):
    section = ("ratelimit", RateLimitSettings)
    name = "ratelimit"
    stages = frozenset({Stage.CONNECT, Stage.RCPT, Stage.DATA})

    def __init__(
        self,
        settings: RateLimitSettings,
        limits: dict[str, Limit],
        store: StateStore,
        on_unavailable: str,
        overrides: Overrides | None = None,
    ) -> None:
        self.settings = settings
        self.limits = limits
        self.store = store
        self.on_unavailable = on_unavailable
        self.overrides = overrides
        self.exempt: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: RateLimitSettings = config.section("ratelimit")
        limits = {name: parse_limit(getattr(s, name)) for name in KINDS}
        active = {name: limit for name, limit in limits.items() if limit is not None}
        if not active:
            return []
        classes = [
            (
                ClientSet.load(
                    spec,
                    config,
                    "a rate-limit override table",
                    ("ratelimit", "overrides", spec),
                    limits=config.section("rules").limits,
                    timeout=config.section("rules").timeout,
                ),
                parse_overrides(text),
            )
            for spec, text in s.overrides.items()
        ]
        overrides = _by_tables(classes) if classes else None
        check = cls(s, active, services.state, config.state.on_unavailable, overrides)
        if s.exempt_mynetworks:
            check.exempt = config.networks
        return [check]

    @classmethod
    def sources(cls, config: Config) -> list[str]:
        s: RateLimitSettings = config.section("ratelimit")
        return [source_of(spec, config) for spec in s.overrides]

    def _limits_for(self, ctx: CheckContext) -> dict[str, Limit]:
        override = self.overrides(ctx) if self.overrides is not None else None
        if override is None:
            return self.limits
        merged: dict[str, Limit | None] = {**self.limits, **override}
        return {name: limit for name, limit in merged.items() if limit is not None}

    def _subject(self, subject: str, ctx: CheckContext) -> str | None:
        """The value a limit is kept for; None when it does not apply (null sender)."""
        address = ctx.session.client.address
        if subject == "ip":
            return str(address)
        if subject == "net":
            return network_of(address, self.settings.ipv4_prefix, self.settings.ipv6_prefix)
        if subject == "sender_domain":
            return ctx.transaction.sender_domain if ctx.transaction else None
        if subject == "recipient":
            return ctx.recipient.address.lower() if ctx.recipient else None
        raise AssertionError(subject)

    async def check(self, ctx: CheckContext) -> Verdict:
        if any(ctx.session.client.address in net for net in self.exempt):
            return DUNNO
        requests: list[tuple[str, str, Window]] = []
        with lookups():
            limits = self._limits_for(ctx)
        for name, limit in limits.items():
            kind = KINDS[name]
            if kind.stage is not ctx.stage:
                continue
            value = self._subject(kind.subject, ctx)
            if not value:
                continue
            # The hash tag {...} puts a client's address and network in one Redis
            # Cluster slot, so that their windows are tested in one script.
            tag = self._subject("net", ctx) if kind.subject == "ip" else value
            key = f"rl:{{{tag}}}:{name}:{round(limit.seconds * 1000)}:{value}"
            requests.append((name, value, Window(key, limit.seconds, limit.count)))
        if not requests:
            return DUNNO
        try:
            hit = await self.store.hit([w for _, _, w in requests])
        except StoreUnavailable:
            return unavailable_verdict(self.on_unavailable, self.name)
        if hit.exceeded is None:
            return DUNNO
        name, value, _ = requests[hit.exceeded]
        return _refusal(name, value)


def _refusal(name: str, value: str) -> Verdict:
    kind = KINDS[name]
    rule = f"ratelimit:{name}"
    if kind.what == "connections":
        reply = Reply(421, "4.7.0", (f"Error: too many connections from {value}",))
        return Verdict(Action.DISCONNECT, reply, rule=rule)
    if kind.subject == "recipient":
        text = f"<{value}>: Error: too much mail for this recipient, try again later"
    else:
        who = f"sender domain {value}" if kind.subject == "sender_domain" else value
        amount = "too many recipients" if kind.what == "recipients" else "too much mail"
        text = f"Error: {amount} from {who}, try again later"
    return Verdict(Action.DEFER, Reply(450, "4.7.1", (text,)), rule=rule)
