"""The HELO name's form: Postfix's reject_invalid_helo_hostname and
reject_non_fqdn_helo_hostname, at HELO.

RFC 5321 §4.1.1.1 asks a client to greet with its fully-qualified domain name, or
an address literal when it has none. Much bulk mail software greets with a bare
word, a name with characters no host name has, or something that is not a name at
all; legitimate servers seldom do. What the name is judged for:

* invalid: neither a host name (letters, digits, "-" and "_" in labels of at most
  63, at most 255 in all, not ending in a numeric label) nor an address literal
  (`[192.0.2.1]`, `[IPv6:2001:db8::1]`). Postfix says `501 5.5.2 <name>: Helo
  command rejected: Invalid name`;
* not fully qualified: a valid name of one label (`localhost`, `mail`). Postfix
  says `504 5.5.2 <name>: Helo command rejected: need fully-qualified hostname`.

Each is refused with Postfix's reply (held for the first RCPT, as any HELO
refusal, with [smtp] delay_reject), scored (HELO_INVALID, HELO_NOT_FQDN), or
let through, as `[helo]` says; both are let through by default. Clients in
mynetworks, and authenticated ones, are ours and are not judged.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..config.settings import setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Action, Symbol, Verdict
from ..reply import Reply

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

Act = Literal["reject", "score", "continue"]
_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class HeloSettings:
    invalid: Act = setting(
        "continue",
        'A HELO name that is neither a host name nor an address literal: "reject" '
        '(501 5.5.2, as reject_invalid_helo_hostname), "score" (HELO_INVALID), "continue".',
    )
    non_fqdn: Act = setting(
        "continue",
        'A HELO name of one label ("localhost"): "reject" (504 5.5.2, as '
        'reject_non_fqdn_helo_hostname), "score" (HELO_NOT_FQDN), "continue".',
    )
    invalid_score: float = setting(2.0, "Score of HELO_INVALID.")
    non_fqdn_score: float = setting(1.0, "Score of HELO_NOT_FQDN.")


def form(name: str) -> Literal["literal", "fqdn", "single", "invalid"]:
    """What the HELO name is: an address literal, a fully-qualified host name, a
    host name of one label, or none of these."""
    if name.startswith("[") and name.endswith("]"):
        inner = name[1:-1]
        if inner[:5].lower() == "ipv6:":
            inner = inner[5:]
            version = 6
        else:
            version = 4
        try:
            return "literal" if ipaddress.ip_address(inner).version == version else "invalid"
        except ValueError:
            return "invalid"
    host = name[:-1] if name.endswith(".") else name
    labels = host.split(".")
    if not host or len(host) > 255 or not all(_LABEL.match(label) for label in labels):
        return "invalid"
    if labels[-1].isdigit():
        return "invalid"  # an address without its brackets, or not a name at all
    return "fqdn" if len(labels) > 1 else "single"


class HeloSyntaxCheck(Check):
    name = "helo_syntax"
    stages = frozenset({Stage.HELO})
    section = ("helo", HeloSettings)

    def __init__(self, settings: HeloSettings) -> None:
        self.settings = settings

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: HeloSettings = config.section("helo")
        return [cls(s)] if s.invalid != "continue" or s.non_fqdn != "continue" else []

    async def check(self, ctx: CheckContext) -> Verdict:
        name = ctx.session.client.helo
        if name is None or ctx.session.relay_permitted:
            return DUNNO
        kind = form(name)
        s = self.settings
        if kind == "invalid":
            return _decide(s.invalid, name, 501, "Invalid name", "HELO_INVALID", s.invalid_score)
        if kind == "single":
            text = "need fully-qualified hostname"
            return _decide(s.non_fqdn, name, 504, text, "HELO_NOT_FQDN", s.non_fqdn_score)
        return DUNNO


def _decide(act: Act, name: str, code: int, text: str, symbol: str, score: float) -> Verdict:
    if act == "score":
        return Verdict(symbols=(Symbol(symbol, score),), rule=f"helo_syntax:{symbol.lower()}")
    if act == "reject":
        shown = "".join(ch if " " < ch <= "~" else "?" for ch in name)[:100]
        reply = Reply(code, "5.5.2", (f"<{shown}>: Helo command rejected: {text}",))
        return Verdict(Action.REJECT, reply, rule=f"helo_syntax:{symbol.lower()}")
    return DUNNO
