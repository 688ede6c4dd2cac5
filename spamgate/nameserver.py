"""One nameserver spamgate asks, with a circuit breaker in front of it.

Without one, a resolver that is down (its port closed, or a path that drops every
packet) costs every lookup its whole `[dns] lifetime`: a session's greeting waits
for the client's verified name and then the DNS lists, its HELO and MAIL for SPF,
and so on for every session, while no answer will come. The breaker turns that
into a fact spamgate knows: after `breaker_failures` consecutive queries to a
nameserver that got no answer at all (a timeout; an unreachable port looks the
same to the asyncio socket), the nameserver counts as down. Lookups then skip it,
and with every nameserver down they fail at once (the checks' usual temperror
and `on_error`). It is logged and counted once, when it happens, and a probe (a
query for the root's NS records, which any recursive resolver answers from
memory) goes to the nameserver every `probe_interval` seconds until any answer
comes back; then it is used again.

A nameserver that answers, even SERVFAIL or REFUSED, is up: those are answers
about a name (a broken domain, a DNS list that refuses us), not about the
nameserver, and must not cut spamgate off from every other name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.message
import dns.nameserver
import dns.resolver

from . import metrics

log = logging.getLogger("spamgate.dns")


class Nameserver:
    """A nameserver: its own dnspython resolver (the cache is shared), and its breaker."""

    def __init__(
        self,
        host: str,
        port: int,
        resolver: dns.asyncresolver.Resolver,
        *,
        failures: int,
        probe_interval: float,
        probe_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.resolver = resolver
        self.threshold = failures  # 0: never considered down
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.up = True
        self.failures = 0  # consecutive queries without an answer
        self._probe: asyncio.Task[None] | None = None
        metrics.DNS_NAMESERVER_UP.labels(self.label).set(1)
        metrics.DNS_BREAKER_OPENED.labels(self.label)

    def answered(self) -> None:
        """A query got an answer (any rcode): the nameserver works."""
        self.failures = 0

    def unanswered(self, why: str) -> None:
        """A query got no answer at all; the last of `threshold` in a row opens the breaker."""
        self.failures += 1
        if not self.up or not self.threshold or self.failures < self.threshold:
            return
        self.up = False
        metrics.DNS_NAMESERVER_UP.labels(self.label).set(0)
        metrics.DNS_BREAKER_OPENED.labels(self.label).inc()
        log.warning(
            "nameserver %s is down: %d queries in a row without an answer (last: %s); "
            "lookups through it fail at once (temperror) until it answers a probe "
            "(every %gs)",
            self.label,
            self.failures,
            why,
            self.probe_interval,
        )
        self._probe = asyncio.ensure_future(self._probing())

    async def _probing(self) -> None:
        query = dns.message.make_query(".", "NS")
        while not self.up:
            await asyncio.sleep(self.probe_interval)
            try:
                await dns.asyncquery.udp(
                    query, self.host, timeout=self.probe_timeout, port=self.port
                )
            except (dns.exception.DNSException, OSError, EOFError, ValueError):
                continue  # no answer (or an unreachable port): still down
            self.up = True
            self.failures = 0
            metrics.DNS_NAMESERVER_UP.labels(self.label).set(1)
            log.warning("nameserver %s answers again: lookups use it again", self.label)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None


def reached(exc: dns.resolver.NoNameservers) -> bool:
    """Whether the nameserver answered (SERVFAIL, REFUSED, a malformed reply...)
    rather than not at all, by what dnspython noted for each attempt."""
    errors = exc.kwargs.get("errors") or []
    return any(len(e) > 4 and e[4] is not None for e in errors) or any(
        len(e) > 3 and isinstance(e[3], str) for e in errors
    )
