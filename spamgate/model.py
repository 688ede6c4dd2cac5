"""The state a check may read: the session, its current transaction and the message.

Checks receive these through a read-only `CheckContext`; only the session driver
and the pipeline runner change them. What the checks found and decided so far
(symbols, held refusals, prepended headers) is the pipeline's `Ledger`. Structured
findings of earlier checks (an SPF result, DKIM results) live in `Results`, keyed
by their type, so a later check asks for `results.get(SpfResult)` and a typo is a
NameError, not a silently missing note.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from dataclasses import dataclass, field
from typing import TypeVar

from .domains import ascii_lower
from .message import Message

T = TypeVar("T")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Stage(enum.Enum):
    """The points of an SMTP session at which checks run, in session order."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command: envelope complete, no content yet
    EOD = "eod"  # end of data: the whole message is known


class Results:
    """Typed findings recorded by the runner, one value per result type."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[type, object] = {}

    def get(self, kind: type[T]) -> T | None:
        value = self._items.get(kind)
        return value if value is None or isinstance(value, kind) else None

    def put(self, value: object) -> None:
        self._items[type(value)] = value

    def all(self) -> list[object]:
        return list(self._items.values())


@dataclass
class TLSInfo:
    version: str
    cipher: str
    bits: int | None = None


@dataclass
class Client:
    """Who is talking to us. `name` is the verified reverse name, or a marker."""

    address: IPAddress
    port: int
    name: str = "[UNAVAILABLE]"  # XCLIENT's spelling when no verified name exists
    helo: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    login: str | None = None  # set after AUTH passthrough succeeded
    local_address: IPAddress | None = None
    local_port: int | None = None

    @property
    def proto(self) -> str:
        return "ESMTP" if self.esmtp else "SMTP"

    @property
    def display(self) -> str:
        """Postfix's `name[addr]` form, as admins grep for it."""
        name = "unknown" if self.name.startswith("[") else self.name
        return f"{name}[{self.address}]"


@dataclass
class Recipient:
    address: str
    params: tuple[str, ...] = ()
    # The reply given for this recipient (ours or the upstream's).
    accepted: bool = False


@dataclass
class Transaction:
    """One MAIL ... DATA cycle; a new one after RSET, HELO or each message."""

    mail_from: str  # "" for the null sender
    mail_params: tuple[str, ...] = ()
    smtputf8: bool = False
    declared_size: int | None = None
    recipients: list[Recipient] = field(default_factory=list)
    message: Message | None = None
    results: Results = field(default_factory=Results)
    started: float = field(default_factory=time.monotonic)
    queue_id: str = ""  # the MTA's, when it tells (a milter's Postfix: the macro i)

    @property
    def sender_domain(self) -> str:
        """The MAIL FROM domain, ASCII letters lower-cased and nothing else: Python's
        Unicode case mapping would make "ban\u212a.test" (Kelvin sign) "bank.test"."""
        return ascii_lower(self.mail_from.rpartition("@")[2]) if "@" in self.mail_from else ""

    @property
    def accepted_recipients(self) -> list[Recipient]:
        return [r for r in self.recipients if r.accepted]


@dataclass
class Session:
    """One client session: a connection to the proxy, or the SMTP session a milter
    is told about (`frontend`: "proxy" or "milter", a metrics label)."""

    id: str
    client: Client
    frontend: str = "proxy"
    started: float = field(default_factory=time.monotonic)
    transaction: Transaction | None = None
    results: Results = field(default_factory=Results)
    pregreet: bool = False  # the client talked before our greeting
    errors: int = 0
    messages: int = 0
    # Set by the core from mynetworks (and AUTH passthrough); checks only read it.
    relay_permitted: bool = False
