"""The checks spamgate knows, in the order they run within a stage.

This list is the only place a check is registered: a new check is a module with a
`Check` subclass, plus one line here (and its settings section, if it has one).
"""

from __future__ import annotations

from .attachments import AttachmentCheck, AttachmentSettings
from .base import Check, CheckContext, TransactionEnd, TransactionObserver
from .clamav import ClamavCheck, ClamavSettings
from .content import BodyRules, HeaderRules
from .dkim import DkimCheck, DkimSettings
from .dmarc import DmarcCheck, DmarcSettings
from .dnsbl import DnsblCheck, DnsblSettings
from .greylist import GreylistCheck, GreylistSettings
from .ratelimit import RateLimitCheck, RateLimitSettings
from .reputation import ReputationCheck, ReputationSettings
from .rhsbl import RhsblCheck, RhsblSettings
from .rspamd import RspamdCheck, RspamdSettings
from .rules import ClientRules, HeloRules, RecipientRules, RulesSettings, SenderRules
from .spamassassin import SpamassassinCheck, SpamassassinSettings
from .spf import SpfCheck, SpfSettings
from .uribl import UriblCheck, UriblSettings

# Ordered: within one stage, checks run in this order and the first final verdict
# wins. Cheap local lookups come before network lookups, so an admin's allowlist
# (OK in a client table) spares the DNS round trips; at end of data the rules come
# before DKIM (which costs CPU), and DMARC comes after DKIM, whose results it reads.
CHECK_TYPES: list[type[Check]] = [
    ClientRules,
    HeloRules,
    SenderRules,
    RecipientRules,
    # Before DNS at connect: a client blocked for its rejections costs no lookup,
    # and ReputationResult(known_good) is recorded before the DNSBL check reads it.
    ReputationCheck,
    # Rate limits count only what the checks before them let through; a
    # connection flood is cut before it costs DNS lookups.
    RateLimitCheck,
    DnsblCheck,
    RhsblCheck,
    SpfCheck,
    # Last at RCPT: never defer what another check would refuse anyway.
    GreylistCheck,
    HeaderRules,
    BodyRules,
    DkimCheck,
    DmarcCheck,
    # Content checks that wait on DNS or a daemon: started together with the
    # stage (Check.concurrent), their verdicts taken in this order.
    UriblCheck,
    AttachmentCheck,
    ClamavCheck,
    RspamdCheck,
    SpamassassinCheck,
]

# Settings sections owned by checks: TOML table name -> dataclass.
CHECK_SECTIONS: dict[str, type] = {
    "rules": RulesSettings,
    "dnsbl": DnsblSettings,
    "rhsbl": RhsblSettings,
    "spf": SpfSettings,
    "ratelimit": RateLimitSettings,
    "greylist": GreylistSettings,
    "reputation": ReputationSettings,
    "dkim": DkimSettings,
    "dmarc": DmarcSettings,
    "uribl": UriblSettings,
    "attachments": AttachmentSettings,
    "clamav": ClamavSettings,
    "rspamd": RspamdSettings,
    "spamassassin": SpamassassinSettings,
}

__all__ = [
    "CHECK_SECTIONS",
    "CHECK_TYPES",
    "Check",
    "CheckContext",
    "TransactionEnd",
    "TransactionObserver",
]
