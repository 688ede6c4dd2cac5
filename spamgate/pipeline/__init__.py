"""The check contract and the runner that applies it.

What a check is (`Check`, the read-only `CheckContext` it decides on, the immutable
`Verdict` it returns) lives here, below the checks, so that a check imports its
contract and nothing above it; `runner.py` runs a stage's entries and is the one
place that logs a decision, applies monitor mode and counts it.
"""

from __future__ import annotations

from ..model import Stage
from .check import Check, CheckContext, OnError, TransactionEnd, TransactionObserver
from .verdict import DUNNO, Action, CheckError, Symbol, Verdict, defer, reject

__all__ = [
    "DUNNO",
    "Action",
    "Check",
    "CheckContext",
    "CheckError",
    "OnError",
    "Stage",
    "Symbol",
    "TransactionEnd",
    "TransactionObserver",
    "Verdict",
    "defer",
    "reject",
]
