"""The transaction log: one line per transaction, its outcome counted, observers told.

Each transaction ends (a message's reply, a refusal of the whole envelope, RSET,
a new HELO, QUIT, a lost client) with one log line in Postfix's spirit, `client=
helo= from=<> to=<> accepted= size= score= outcome= end= reply=`, its outcome in
spamgate_transactions_total, and a snapshot (`TransactionEnd`) to the checks that
learn from outcomes (off the reply path, as background tasks) and to the session's
observer. Each recipient's outcome is counted as it is answered; which entry
refused it says why (relay control: relay_denied), not the wording of the reply.
"""

from __future__ import annotations

import logging

from .. import metrics
from ..background import Background
from ..model import Recipient, Session, Transaction
from ..pipeline.check import TransactionEnd, TransactionObserver
from ..pipeline.ledger import Ledger
from ..reply import TEMP_UPSTREAM, Reply


class TransactionLog:
    """The outcome bookkeeping of the current transaction of one session."""

    __slots__ = (
        "background",
        "counted",
        "ledger",
        "lines",
        "log",
        "observers",
        "refused",
        "session",
        "upstream_refused",
    )

    def __init__(
        self,
        session: Session,
        ledger: Ledger,
        log: logging.LoggerAdapter,
        observers: list[TransactionObserver],
        background: Background,
        *,
        counted: bool = True,
    ) -> None:
        self.session = session
        self.counted = counted  # False: outcomes count in no metric (a replay)
        self.ledger = ledger
        self.log = log
        self.observers = observers
        self.background = background
        self.refused: list[Reply] = []  # our refusals in this transaction
        self.upstream_refused: list[Reply] = []  # the upstream's
        self.lines = 0  # transaction lines logged in this session

    def refuse(self, reply: Reply) -> None:
        """We refused a command of this transaction with `reply`."""
        self.refused.append(reply)

    def upstream_refuse(self, reply: Reply) -> None:
        self.upstream_refused.append(reply)

    def recipient(self, rcpt: Recipient, reply: Reply, decider: str | None) -> None:
        """Count a RCPT's outcome (and log a refusal)."""
        if rcpt.accepted:
            outcome = "accepted"
        elif decider == "relay":
            outcome = "relay_denied"
        elif reply in self.upstream_refused:
            outcome = "upstream_rejected"
        else:
            outcome = "tempfailed" if reply.code < 500 else "rejected"
        if self.counted:
            metrics.child(metrics.RECIPIENTS, outcome).inc()
        if not rcpt.accepted:
            self.log.info("rcpt <%s> refused: %s", rcpt.address, reply)

    def end(
        self,
        reply: Reply | None,
        *,
        size: int | None = None,
        outcome: str | None = None,
        reason: str | None = None,
    ) -> None:
        """The transaction is over: log its line, count its outcome, tell observers."""
        session = self.session
        txn = session.transaction
        if txn is None:
            return
        if outcome is None:
            outcome = self._outcome(txn, reply)
        if self.counted:
            metrics.child(metrics.TRANSACTIONS, session.frontend, outcome).inc()
        score = self.ledger.scorer.total
        self._notify(txn, outcome, score)
        if self.log.isEnabledFor(logging.INFO):
            self._line(txn, outcome, score, reply, size, reason)
        self.lines += 1
        session.transaction = None
        self.refused = []
        self.upstream_refused = []
        self.ledger.end_transaction()

    def _line(
        self,
        txn: Transaction,
        outcome: str,
        score: float,
        reply: Reply | None,
        size: int | None,
        reason: str | None,
    ) -> None:
        c = self.session.client
        to = ",".join(f"<{r.address}>" for r in txn.recipients) or "-"
        parts = [f"queue_id={txn.queue_id}"] if txn.queue_id else []
        parts += [
            f"client={c.display}:{c.port}",
            f"helo={c.helo or '-'}",
            f"from=<{txn.mail_from}>",
            f"to={to}",
            f"accepted={len(txn.accepted_recipients)}",
        ]
        if size is not None:
            parts.append(f"size={size}")
        if self.ledger.scorer.any:
            parts.append(f"score={score:.1f}")
        parts.append(f"outcome={outcome}")
        if reason:
            parts.append(f"end={reason}")
        if reply is not None:
            parts.append(f'reply="{reply}"')
        self.log.info(" ".join(parts))

    def _outcome(self, txn: Transaction, reply: Reply | None) -> str:
        if reply is not None and reply.code // 100 == 2:
            return "accepted"
        if reply is not None and reply in self.refused:
            return "tempfailed" if reply.code < 500 else "rejected"
        if reply is not None and reply == TEMP_UPSTREAM:
            return "tempfailed"
        if reply is not None:
            return "upstream_rejected"
        if not txn.accepted_recipients and self.refused:
            return "rejected" if any(r.code >= 500 for r in self.refused) else "tempfailed"
        if not txn.accepted_recipients and self.upstream_refused:
            return "upstream_rejected"
        return "aborted"

    def _notify(self, txn: Transaction, outcome: str, score: float) -> None:
        """Tell the observers how the transaction ended, off the reply path."""
        observer = self.ledger.observer
        if not self.observers and observer is None:
            return
        event = TransactionEnd(
            client=self.session.client.address,
            trusted=self.session.relay_permitted,
            sender=txn.mail_from,
            recipients=tuple(r.address for r in txn.accepted_recipients),
            outcome=outcome,
            score=score,
        )
        if observer is not None:
            observer.transaction_end(event)
        for learner in self.observers:
            name = getattr(learner, "label", type(learner).__name__)
            self.background.spawn(learner.on_transaction_end(event), f"{name} outcome")
