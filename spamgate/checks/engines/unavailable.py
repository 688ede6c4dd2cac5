"""What a stateful check decides while its state store cannot answer.

The store raises `StoreUnavailable` (Redis down or slow) and decides nothing; the
check that asked turns it into a verdict per `[state] on_unavailable`: "open" goes
on as if the check had no opinion, "tempfail" says 451 so the client retries.
"""

from __future__ import annotations

from ...pipeline.verdict import DUNNO, Action, Verdict
from ...reply import Reply

UNAVAILABLE = Reply(451, "4.3.0", ("Temporary failure in a message check, try again later",))


def unavailable_verdict(policy: str, check: str) -> Verdict:
    """The verdict of a check whose store is unreachable, per `[state] on_unavailable`."""
    if policy == "tempfail":
        return Verdict(Action.DEFER, UNAVAILABLE, rule=f"{check}:store-unavailable")
    return DUNNO
