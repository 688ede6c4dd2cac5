"""Relay control: the rule that keeps spamgate from being an open relay.

It is one of the core's entries, not a check: mandatory, so no rule file, monitor
mode, allowlist or [auth] skip_checks can turn it off. A recipient is accepted
when its domain is one of ours (`relay_domains`, where ".example.com" also covers
subdomains), when it is the bare `postmaster` mailbox (RFC 5321 §4.5.1), or when
the client may relay (`mynetworks`, or authenticated through AUTH passthrough).

Two rules keep "one of ours" from meaning more here than it does to the
upstream, which would then relay what we let through:

* A client that may not relay may not route either: a local part that names
  another host (`user%host@ours`, `host!user@ours`, `"user@host"@ours`) is
  refused, as Postfix refuses it with `allow_untrusted_routing = no`. A source
  route (`@a,@b:user@ours`) is no such thing: the parser drops it (RFC 5321
  Appendix C), as Postfix does, and only `user@ours` goes upstream.
* Domains are compared as DNS compares them: ASCII case-insensitively, and a
  non-ASCII domain as its IDNA 2008 A-label, which it must have. Never with
  Unicode case folding: Python lower-cases the Kelvin sign "\u212a" to "k", so
  `user@ban\u212a.test` would have been one of ours for relay domain
  bank.test, and another domain to everyone else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..domains import ascii_lower, domain_key
from ..model import IPAddress, Stage
from ..reply import Reply
from .entry import CoreEntry
from .verdict import Action, Verdict

if TYPE_CHECKING:
    from .check import CheckContext
    from .ledger import Ledger

_ESCAPE = re.compile(r"\\(.)")
_ROUTING = frozenset("@%!")


def routed(recipient: str) -> bool:
    """Whether the local part asks for sender-specified routing (user%host,
    host!user, "user@host"), quoted or not."""
    local, at, _ = recipient.rpartition("@")
    if not at:
        return False
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = _ESCAPE.sub(r"\1", local[1:-1])
    return not _ROUTING.isdisjoint(local)


class RelayPolicy:
    def __init__(self, relay_domains: Iterable[str], mynetworks: Iterable[str]) -> None:
        self.exact: set[str] = set()
        self.parents: tuple[str, ...] = ()
        parents = []
        for d in relay_domains:
            key = domain_key(d.lstrip("."), lenient=True)
            if key is None:
                continue  # refused when the configuration is loaded
            if d.startswith("."):
                parents.append("." + key)
            else:
                self.exact.add(key)
        self.parents = tuple(parents)
        self.networks = [ipaddress.ip_network(n, strict=False) for n in mynetworks]

    def trusted(self, address: IPAddress) -> bool:
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.networks)

    def is_local(self, recipient: str) -> bool:
        _, at, domain = recipient.rpartition("@")
        if not at:
            return ascii_lower(recipient) == "postmaster"
        key = domain_key(domain)
        if key is None:
            return False
        if key in self.exact:
            return True
        return bool(self.parents) and key.endswith(self.parents)

    def accepts(self, recipient: str) -> bool:
        """Whether a client that may not relay may send to `recipient`."""
        return self.is_local(recipient) and not routed(recipient)

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
        if rcpt is None or ctx.session.relay_permitted or self.policy.accepts(rcpt.address):
            return None
        return Verdict(Action.REJECT, self.policy.denied(rcpt.address))
