"""The checks spamgate knows, in the order they run within a stage.

This list is the only place a check is registered: a new check is a module with a
`Check` subclass (its settings section named on the class, `Check.section`), plus
one line here. The composition root (`app.py`) builds the checks of this list, and
hands the configuration loader their sections.
"""

from __future__ import annotations

from ..pipeline.check import Check
from .attachments import AttachmentCheck
from .clamav import ClamavCheck
from .content import BodyRules, HeaderRules
from .dkim import DkimCheck
from .dmarc import DmarcCheck
from .dnsbl import DnsblCheck
from .greylist import GreylistCheck
from .helo import HeloSyntaxCheck
from .ratelimit import RateLimitCheck
from .reputation import ReputationCheck
from .rhsbl import RhsblCheck
from .rspamd import RspamdCheck
from .rules import ClientRules, HeloRules, RecipientRules, SenderRules
from .spamassassin import SpamassassinCheck
from .spf import SpfCheck
from .uribl import UriblCheck

# Ordered: within one stage, checks run in this order and the first final verdict
# wins. Cheap local lookups come before network lookups, so an admin's allowlist
# (OK in a client table) spares the DNS round trips; at end of data the rules come
# before DKIM (which costs CPU), and DMARC comes after DKIM, whose results it reads.
CHECK_TYPES: list[type[Check]] = [
    ClientRules,
    HeloRules,
    HeloSyntaxCheck,
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
