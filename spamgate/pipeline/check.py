"""The check interface: a name, the stages it runs at, one async decision.

A check is built once per configuration (`from_config`), so parsing and validation
never happen on the hot path. It reads the session through a `CheckContext` and
returns a `Verdict`; the pipeline runner applies timeouts, error policy, monitor mode
and metrics, so a check contains only its own logic.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from ..model import IPAddress, Recipient, Session, Stage, Transaction
from .verdict import CheckError, Verdict

if TYPE_CHECKING:
    from ..config import Config
    from ..message import Message
    from ..services import Services

OnError = Literal["continue", "tempfail"]

# A metric series a check or its result names, without importing the metrics: the
# exposition name ("spamgate_dnsbl_results_total") and the label values. A result
# may also name a histogram observation as (name, labels, value).
Series = tuple[str, Sequence[str]]

__all__ = [
    "Check",
    "CheckContext",
    "CheckError",
    "OnError",
    "Series",
    "TransactionEnd",
    "TransactionObserver",
]


@dataclass(frozen=True, slots=True)
class CheckContext:
    """What a check may read. Treat every object here as read-only."""

    stage: Stage
    session: Session
    transaction: Transaction | None = None
    recipient: Recipient | None = None  # the RCPT being decided, at Stage.RCPT
    message: Message | None = None  # at Stage.EOD
    # A refusal held for the first RCPT (delayed rejection): the client is refused
    # already, so a check with costly lookups may spare them.
    held: Verdict | None = None


class Check(abc.ABC):
    """Base class of every check. Subclasses set `name` and `stages`."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[Stage]]
    # The configuration section the check owns: its TOML table name and the
    # dataclass of its settings (`config.settings.setting` fields). Checks may share
    # one (the rule tables' [rules]); the loader accepts the sections of the checks
    # it is handed, and `config.section(name)` returns the parsed one.
    section: ClassVar[tuple[str, type] | None] = None
    # Per-instance policy, settable from each check's config section.
    timeout: float = 10.0
    on_error: OnError = "continue"
    # True: the runner starts this check when the stage starts, beside the other
    # concurrent ones (content scanners waiting on their daemons), and still takes
    # its verdict in registration order. Only for checks that read no finding of
    # another check of the same stage.
    concurrent: ClassVar[bool] = False
    # What `spamgate replay` must have of a message to run this check again at end
    # of data, rather than give back the verdict it recorded: "body" (the whole
    # message: captures with store_messages), "header" (the header section, of a
    # message without MIME parts), "daemon" (a scanner daemon, which a replay
    # never asks: always the recorded verdict). At the other stages every check
    # runs again, on the recorded DNS and state store answers.
    replay_needs: ClassVar[str] = "body"

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        """The instances this check contributes for a configuration (may be none).

        Raise `settings.ConfigError` with `file:line: message` texts for problems
        found in files the check reads (rule tables), so a reload can refuse them.
        """

    @classmethod
    def sources(cls, config: Config) -> list[str]:
        """Files this check reads for `config`; a change to one triggers a reload."""
        return []

    @abc.abstractmethod
    async def check(self, ctx: CheckContext) -> Verdict:
        """Decide for `ctx.stage`; must not modify `ctx`."""

    def metric_series(self) -> Iterable[Series]:
        """Counter series this check's verdicts and results can add to, by labels.

        Known rule ids (`spamgate_rule_hits_total`, ("table", "rule")) and DNS list
        zones (`spamgate_dnsbl_results_total`) are created at zero when the
        configuration loads, so that Prometheus sees a rule's first hit as an
        increase, not as a new series that starts at 1. The check only names
        them; it never counts.
        """
        return ()

    def failure(self, kind: str) -> object | None:
        """A finding to count when this check fails (`kind`: exception, timeout, or a
        `CheckError`'s), as a result that names its series (`counted()`); None: the
        runner's own spamgate_check_errors_total says it all."""
        return None

    @property
    def label(self) -> str:
        """The name used in logs and metric labels (closed set: from config)."""
        return self.name


@dataclass(frozen=True, slots=True)
class TransactionEnd:
    """A transaction as it ended: what checks that learn from outcomes are told.

    A snapshot of plain values, not the live session, because observers run after
    the flow has moved on (see `TransactionObserver`).
    """

    client: IPAddress
    trusted: bool  # mynetworks or authenticated: the session could relay
    sender: str
    recipients: tuple[str, ...]  # accepted ones
    # The `spamgate_transactions_total` label: accepted, rejected, tempfailed,
    # discarded, quarantined, upstream_rejected, aborted.
    outcome: str
    score: float


class TransactionObserver(abc.ABC):
    """Mixed into a check that learns from outcomes (reputation memory).

    The flow calls `on_transaction_end` for every transaction that ends, however it
    ends, on the checks of the session's policy. It runs as a background task
    (`Services.background`): no client reply waits for it, and it must not touch
    the session. Being a base class, not a method found by name, a misspelt hook
    is an error instead of a hook that silently never runs.
    """

    @abc.abstractmethod
    async def on_transaction_end(self, event: TransactionEnd) -> None:
        """Learn from `event`; exceptions are logged by the background runner."""
