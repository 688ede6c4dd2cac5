"""The resolver and the state store, as the checks see them, with what they answered
written down for the session that asked.

A check asks DNS and the state store through the services it was built with; it
never says for which session. The session's recorder says it instead: it sets
`TAPE` (a context variable) when the driver hands it an event, and every lookup
made on that session's behalf, in its task or in tasks and threads started from
it (concurrent checks, pyspf's worker thread: `spfquery` runs it in a copy of
the context), finds the recorder there and is added to its tape. Lookups made for
nobody (the resolver's own probes, background work after a transaction's record
is done) find none and cost one context-variable read.

The variable holds a `Reel`, not the recorder: contexts are copied into every
timer and task a session starts (the runner's check timeouts among them), and a
cancelled timer can keep its copy for as long as the timeout it stood for. The
recorder empties its reel when the session closes, so those copies keep nothing
of the session alive.

What is kept is exactly what the check received: the answer (records and TTL,
NXDOMAIN, no data) or the failure (`DnsError`: time-out or error), a cache hit
as much as a query, and the state store's answer or `StoreUnavailable`. A replay
(`spamgate replay`) gives them back in the same order, and a record never needs
the network.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

import dns.name

from ..resolver import DnsAnswer, DnsError, Resolver
from ..state import Hit, StateStore, StoreUnavailable, Window

if TYPE_CHECKING:
    from ..model import IPAddress


class Tape(Protocol):
    """What a session's recorder takes from the wrappers below."""

    def dns(self, name: str | dns.name.Name, rdtype: str, answer: DnsAnswer | DnsError) -> None:
        """A DNS answer (or failure) a check received."""

    def state(self, entry: tuple) -> None:
        """A state store operation and its answer: ("hit", windows, Hit | None),
        ("first_seen", key, ttl, age | None), ("marked", keys, answers | None);
        None: the store was unavailable."""


class Reel:
    """Holds a session's recorder until the session closes (`tape` None after)."""

    __slots__ = ("tape",)

    def __init__(self, tape: Tape) -> None:
        self.tape: Tape | None = tape


_EMPTY = Reel.__new__(Reel)
_EMPTY.tape = None

# The reel of the session whose event is being handled.
TAPE: contextvars.ContextVar[Reel] = contextvars.ContextVar("spamgate_tape", default=_EMPTY)


class RecordingResolver(Resolver):
    """The configured resolver; what it answers goes on the asking session's tape."""

    def __init__(self, inner: Resolver) -> None:
        self.inner = inner

    @property
    def lifetime(self) -> float:  # type: ignore[override]
        return self.inner.lifetime

    def cached(self, name: str | dns.name.Name, rdtype: str) -> DnsAnswer | None:
        answer = self.inner.cached(name, rdtype)
        if answer is not None:
            tape = TAPE.get().tape
            if tape is not None:
                tape.dns(name, rdtype, answer)
        return answer

    async def lookup(
        self, name: str | dns.name.Name, rdtype: str, *, timeout: float | None = None
    ) -> DnsAnswer:
        tape = TAPE.get().tape
        if tape is None:
            return await self.inner.lookup(name, rdtype, timeout=timeout)
        try:
            answer = await self.inner.lookup(name, rdtype, timeout=timeout)
        except DnsError as exc:
            tape.dns(name, rdtype, exc)
            raise
        tape.dns(name, rdtype, answer)
        return answer

    def reused(self, answers: Iterable[tuple[tuple[str, str], DnsAnswer]]) -> None:
        tape = TAPE.get().tape
        if tape is not None:
            for (name, rdtype), answer in answers:
                tape.dns(name, rdtype, answer)

    async def verified_name(self, address: IPAddress) -> str:
        # The name itself is a fact of the record (the client's), not a lookup.
        return await self.inner.verified_name(address)

    async def aclose(self) -> None:
        await self.inner.aclose()


class RecordingStore(StateStore):
    """The configured state store; its answers go on the asking session's tape.

    Only what a check reads is kept (`hit`, `first_seen`, `marked`): what it
    writes (`mark`, `unmark`) changes what later sessions read, and those read
    it themselves.
    """

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self.inner.kind

    async def hit(self, windows: Sequence[Window]) -> Hit:
        tape = TAPE.get().tape
        if tape is None:
            return await self.inner.hit(windows)
        try:
            hit = await self.inner.hit(windows)
        except StoreUnavailable:
            tape.state(("hit", tuple(windows), None))
            raise
        tape.state(("hit", tuple(windows), hit))
        return hit

    async def first_seen(self, key: str, ttl: float) -> float:
        tape = TAPE.get().tape
        if tape is None:
            return await self.inner.first_seen(key, ttl)
        try:
            age = await self.inner.first_seen(key, ttl)
        except StoreUnavailable:
            tape.state(("first_seen", key, ttl, None))
            raise
        tape.state(("first_seen", key, ttl, age))
        return age

    async def marked(self, keys: Sequence[str]) -> tuple[bool, ...]:
        tape = TAPE.get().tape
        if tape is None:
            return await self.inner.marked(keys)
        try:
            found = await self.inner.marked(keys)
        except StoreUnavailable:
            tape.state(("marked", tuple(keys), None))
            raise
        tape.state(("marked", tuple(keys), found))
        return found

    async def mark(self, key: str, ttl: float) -> None:
        await self.inner.mark(key, ttl)

    async def unmark(self, keys: Sequence[str]) -> None:
        await self.inner.unmark(keys)

    async def ping(self) -> None:
        await self.inner.ping()

    @property
    def available(self) -> bool:
        return self.inner.available

    def describe(self) -> str:
        return self.inner.describe()

    async def aclose(self) -> None:
        await self.inner.aclose()
