"""What the pipeline has found and decided in one session so far.

The runner writes here as it takes each entry's verdict: symbols (`scoring.Scorer`),
the header fields rules prepend, refusals held for the first RCPT and disposals
(`delayed.Held`). The session driver reads it to build the reply, the headers and
the transaction log, and tells it when a HELO or a transaction ends. Structured
findings (an SPF result) live in the session's and transaction's `Results`,
where checks read them.
"""

from __future__ import annotations

from .delayed import Held
from .observer import Observer
from .scoring import Scorer


class Ledger:
    __slots__ = ("_header_mark", "headers", "held", "observer", "scorer", "txn_headers")

    def __init__(self, symbol_scores: dict[str, float], observer: Observer | None = None) -> None:
        self.scorer = Scorer(symbol_scores)
        self.held = Held()
        self.headers: list[tuple[str, str]] = []  # the session's (connect, HELO)
        self.txn_headers: list[tuple[str, str]] = []
        self._header_mark = 0
        # Sees every entry's verdict, every reply, every transaction's end.
        self.observer = observer

    def add_headers(self, headers: tuple[tuple[str, str], ...], *, transaction: bool) -> None:
        (self.txn_headers if transaction else self.headers).extend(headers)

    def mark_connect(self) -> None:
        """Connect is over: a new HELO forgets what came after this."""
        self.scorer.mark_connect()
        self._header_mark = len(self.headers)

    def forget_helo(self) -> None:
        """A new HELO: what the previous one decided no longer holds."""
        self.scorer.forget_helo()
        del self.headers[self._header_mark :]
        self.held.forget_helo()

    def end_transaction(self) -> None:
        self.scorer.end_transaction()
        self.txn_headers = []
        self.held.end_transaction()
