"""The checks spamgate knows, in the order they run within a stage.

This list is the only place a check is registered: a new check is a module with a
`Check` subclass, plus one line here (and its settings section, if it has one).
"""

from __future__ import annotations

from .base import Check, CheckContext
from .content import BodyRules, HeaderRules
from .rules import ClientRules, HeloRules, RecipientRules, RulesSettings, SenderRules

# Ordered: within one stage, checks run in this order and the first final verdict
# wins. Cheap local lookups come before network lookups.
CHECK_TYPES: list[type[Check]] = [
    ClientRules,
    HeloRules,
    SenderRules,
    RecipientRules,
    HeaderRules,
    BodyRules,
]

# Settings sections owned by checks: TOML table name -> dataclass.
CHECK_SECTIONS: dict[str, type] = {"rules": RulesSettings}

__all__ = ["CHECK_SECTIONS", "CHECK_TYPES", "Check", "CheckContext"]
