"""Relay control: the rule that keeps spamgate from being an open relay.

It is one of the core's entries, not a check: mandatory, so no rule file, monitor
mode, allowlist or [auth] skip_checks can turn it off. A recipient is accepted
when its domain is one of ours (`relay_domains`, where ".example.com" also covers
subdomains), when it is the bare `postmaster` mailbox (RFC 5321 §4.5.1), or when
the client may relay (`mynetworks`, or authenticated through AUTH passthrough).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..model import IPAddress, Stage
from ..reply import Reply
from .entry import CoreEntry
from .verdict import Action, Verdict

if TYPE_CHECKING:
    from .check import CheckContext
    from .ledger import Ledger


class RelayPolicy:
    def __init__(self, relay_domains: Iterable[str], mynetworks: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.parents: tuple[str, ...] = ()
        parents = []
        for d in relay_domains:
            d = d.lower().rstrip(".")
            if d.startswith("."):
                parents.append(d)
            else:
                self.exact.add(d)
        self.parents = tuple(parents)
        self.networks = [ipaddress.ip_network(n, strict=False) for n in mynetworks]

    def trusted(self, address: IPAddress) -> bool:
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks)

    def is_local(self, recipient: str) -> bool:
        _, at, domain = recipient.rpartition("@")
        if not at:
            return recipient.lower() == "postmaster"
        domain = domain.lower().rstrip(".")
        if domain in self.exact:
            return True
        return bool(self.parents) and domain.endswith(self.parents)

    @staticmethod
    def denied(recipient: str) -> Reply:
        return Reply(554, "5.7.1", (f"<{recipient}>: Relay access denied",))


class RelayControl(CoreEntry):
    """At each RCPT: the recipient is ours, or the client may relay; else 554."""

    label = "relay"
    mandatory = True
    decisions = ((Stage.RCPT, Action.REJECT),)

    def __init__(self, policy: RelayPolicy) -> None:
        self.policy = policy

    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        rcpt = ctx.recipient
        if rcpt is None or ctx.session.relay_permitted or self.policy.is_local(rcpt.address):
            return None
        return Verdict(Action.REJECT, self.policy.denied(rcpt.address))
