"""The checks spamgate knows, in the order they run within a stage.

This list is the only place a check is registered: a new check is a module with a
`Check` subclass, plus one line here (and its settings section, if it has one).
"""

from __future__ import annotations

from .base import Check, CheckContext
from .content import BodyRules, HeaderRules
from .dkim import DkimCheck, DkimSettings
from .dmarc import DmarcCheck, DmarcSettings
from .dnsbl import DnsblCheck, DnsblSettings
from .rhsbl import RhsblCheck, RhsblSettings
from .rules import ClientRules, HeloRules, RecipientRules, RulesSettings, SenderRules
from .spf import SpfCheck, SpfSettings

# Ordered: within one stage, checks run in this order and the first final verdict
# wins. Cheap local lookups come before network lookups, so an admin's allowlist
# (OK in a client table) spares the DNS round trips; at end of data the rules come
# before DKIM (which costs CPU), and DMARC comes after DKIM, whose results it reads.
CHECK_TYPES: list[type[Check]] = [
    ClientRules,
    HeloRules,
    SenderRules,
    RecipientRules,
    DnsblCheck,
    RhsblCheck,
    SpfCheck,
    HeaderRules,
    BodyRules,
    DkimCheck,
    DmarcCheck,
]

# Settings sections owned by checks: TOML table name -> dataclass.
CHECK_SECTIONS: dict[str, type] = {
    "rules": RulesSettings,
    "dnsbl": DnsblSettings,
    "rhsbl": RhsblSettings,
    "spf": SpfSettings,
    "dkim": DkimSettings,
    "dmarc": DmarcSettings,
}

__all__ = ["CHECK_SECTIONS", "CHECK_TYPES", "Check", "CheckContext"]
