"""The core's own decisions, as entries the runner runs beside the checks.

Relay control, the size and recipient limits, refusals of malformed content,
pregreet, the score thresholds and the refusals held for the first RCPT (delayed
rejection) are decisions like any check's: the runner runs them in their place in
a stage's list, logs them, applies monitor mode to them (or not: `mandatory`) and
counts them, so "why was this refused" has one answer, in one place, whoever
decided. Unlike checks they are the core's: not configured away, never skipped for
an authenticated client, never timed out (they only compute).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import TYPE_CHECKING, ClassVar

from ..model import Stage
from .verdict import Action, Verdict

if TYPE_CHECKING:
    from .check import CheckContext
    from .ledger import Ledger


class CoreEntry(abc.ABC):
    """One of the core's decisions at a stage."""

    # The name in logs and in the `check` label of spamgate_verdicts_total.
    label: ClassVar[str]
    # Enforced in monitor mode too: relay control, the limits, protocol refusals.
    mandatory: ClassVar[bool] = False
    # False: the verdict was decided and counted earlier, and is only given now
    # (a refusal held for the first RCPT); the runner neither logs nor counts it.
    records: ClassVar[bool] = True
    # Its refusal always waits for the first RCPT, whatever [smtp] delay_reject
    # says (pregreet "enforce", as postscreen's).
    always_held: ClassVar[bool] = False
    # (stage, action) of every decision it can make, created at zero with the
    # configuration; monitor mode's counterparts too unless it is mandatory.
    decisions: ClassVar[tuple[tuple[Stage, Action], ...]] = ()

    @abc.abstractmethod
    def decide(self, ctx: CheckContext, ledger: Ledger) -> Verdict | None:
        """The verdict at `ctx.stage`, or None for no opinion."""

    def series(self) -> Iterable[tuple[Stage, str, Action]]:
        """(stage, label, action) of each decision, for spamgate_verdicts_total."""
        for stage, action in self.decisions:
            yield stage, self.label, action
