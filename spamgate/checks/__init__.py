"""The checks spamgate knows, in the order they run within a stage.

This list is the only place a check is registered: a new check is a module with a
`Check` subclass, plus one line here (and its settings section, if it has one).
"""

from __future__ import annotations

from .base import Check, CheckContext, TransactionEnd, TransactionObserver
from .greylist import GreylistCheck, GreylistSettings
from .ratelimit import RateLimitCheck, RateLimitSettings
from .reputation import ReputationCheck, ReputationSettings

# Ordered: within one stage, checks run in this order and the first final verdict
# wins. Cheap local lookups come before network lookups.
CHECK_TYPES: list[type[Check]] = [
    # First at connect: a blocked client costs nothing more, and it records
    # ReputationResult before the DNSBL check reads it.
    ReputationCheck,
    # Rate limits count only requests that earlier checks let through.
    RateLimitCheck,
    # Last at RCPT: never defer what another check would refuse anyway.
    GreylistCheck,
]

# Settings sections owned by checks: TOML table name -> dataclass.
CHECK_SECTIONS: dict[str, type] = {
    "ratelimit": RateLimitSettings,
    "greylist": GreylistSettings,
    "reputation": ReputationSettings,
}

__all__ = [
    "CHECK_SECTIONS",
    "CHECK_TYPES",
    "Check",
    "CheckContext",
    "TransactionEnd",
    "TransactionObserver",
]
