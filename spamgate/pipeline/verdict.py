"""What a check decides, as an immutable value.

A check never writes to the socket, the session or the metrics: it returns a
`Verdict`, and the pipeline runner applies it. The vocabulary is Postfix's access(5)
one (OK, DUNNO, REJECT, DEFER, DISCARD, HOLD, PREPEND, WARN) plus SCORE, so that an
admin reading a rule file or a log line sees words they already know.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..reply import Reply, default_enhanced


class Action(enum.Enum):
    """Final actions end the evaluation of a stage; the others only annotate."""

    DUNNO = "dunno"  # no opinion
    OK = "ok"  # accept: skip the remaining checks of this stage
    REJECT = "reject"  # 5xx
    DEFER = "defer"  # 4xx
    DISCONNECT = "disconnect"  # 421/521: reply, then close the session
    DISCARD = "discard"  # say 250, drop the message
    HOLD = "hold"  # say 250, put the message in quarantine
    TAG = "tag"  # mark the message as spam (X-Spam headers); not final

    @property
    def is_final(self) -> bool:
        return self not in _NOT_FINAL

    @property
    def refuses(self) -> bool:
        """Actions that monitor mode turns into a log line."""
        return self in _REFUSING


_NOT_FINAL = frozenset({Action.DUNNO, Action.TAG})
_REFUSING = frozenset(
    {Action.REJECT, Action.DEFER, Action.DISCONNECT, Action.DISCARD, Action.HOLD, Action.TAG}
)


@dataclass(frozen=True, slots=True)
class Symbol:
    """A named finding with the score its source suggests; config may override it."""

    name: str
    score: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """One check's answer for one stage.

    `rule` names what fired (`table:line`, `dnsbl:zone`, ...) for the log, the reply
    and the metrics. `result` is a structured finding (an SPF result, DKIM results)
    that the runner records for later stages, keyed by its type.
    """

    action: Action = Action.DUNNO
    reply: Reply | None = None
    headers: tuple[tuple[str, str], ...] = ()
    symbols: tuple[Symbol, ...] = ()
    warn: str | None = None
    rule: str | None = None
    result: object | None = None
    # WARN in a rule file: the action is logged and counted as "would", not done.
    monitor: bool = False
    # Monitor-only actions met on the way to this verdict (`WARN REJECT` rules the
    # lookup went past); the runner logs and counts each as "would".
    would: tuple[Verdict, ...] = ()
    # Rule table entries that matched, as (table, line), for the rule-hit metric.
    hits: tuple[tuple[str, int], ...] = ()

    @property
    def is_final(self) -> bool:
        return self.action.is_final


DUNNO = Verdict()


class CheckError(Exception):
    """A check could not decide for a known reason (a lookup ran out of time).

    The runner logs it in one line, without a traceback, and applies the check's
    `on_error`; `kind` is the metric label (timeout, exception).
    """

    kind = "exception"

    def __init__(self, message: str = "", *, quiet: bool = False, result: object = None) -> None:
        super().__init__(message)
        # The check logged this failure itself (a backend outage is logged once,
        # when it starts): the runner logs it at debug level only.
        self.quiet = quiet
        # A `metrics.Counted` finding to count anyway (the outage's start).
        self.result = result


@dataclass(frozen=True, slots=True)
class CheckFailures:
    """The checks that failed in a session or transaction (an exception, a timeout,
    a `CheckError`), as (check label, kind): recorded by the runner, so that a
    later check can tell a result that is missing because spamgate failed from one
    that is missing because there was nothing to find (DMARC with a dead DKIM
    worker must not judge as if the message were unsigned)."""

    failed: tuple[tuple[str, str], ...] = ()

    def __contains__(self, label: object) -> bool:
        return any(name == label for name, _ in self.failed)

    def add(self, label: str, kind: str) -> CheckFailures:
        return CheckFailures((*self.failed, (label, kind)))


def reject(text: str = "Access denied", code: int = 554, *, rule: str | None = None) -> Verdict:
    reply = Reply.make(code, text)
    if reply.enhanced is None:
        reply = Reply(code, default_enhanced(code), reply.lines)
    return Verdict(Action.REJECT, reply, rule=rule)


def defer(text: str = "Try again later", code: int = 450, *, rule: str | None = None) -> Verdict:
    reply = Reply.make(code, text)
    if reply.enhanced is None:
        reply = Reply(code, default_enhanced(code), reply.lines)
    return Verdict(Action.DEFER, reply, rule=rule)


@dataclass
class Outcome:
    """What the runner made of one stage (mutable while it runs): its final verdict,
    who decided it (a check's label, or the core's: relay, limits, score, ...), and
    whether a refusal was held for the first RCPT rather than given now."""

    final: Verdict | None = None
    decider: str | None = None
    held: bool = False

    @property
    def refusal(self) -> Verdict | None:
        """The refusal to give now, with its reply (not a held one, not DISCARD/HOLD)."""
        final = self.final
        if final is None or final.reply is None or self.held:
            return None
        return final
