"""Answers for /healthz and /readyz, computed on the event loop for the HTTP threads.

/healthz says the process is alive: the event loop runs a no-op within a second
or two (a wedged loop is a dead proxy even if the process exists). /readyz says
the proxy can take mail: it listens, a configuration with its rules is loaded, and
the upstream MTA answers. The upstream probe opens an SMTP connection, so its
answer is reused for `[metrics] probe_interval` seconds and concurrent requests
share one probe: a burst of readiness checks reaches the MTA at most once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from .. import metrics
from ..app import Runtime
from .exporter import Status

LOOP_TIMEOUT = 2.0  # seconds the event loop may take to run a no-op
PROBE_TIMEOUT = 10.0  # a probe that takes longer counts as a failure


class UpstreamProbe:
    """`Upstream.probe()`, cached for `ttl` seconds and never run twice at once."""

    def __init__(self, probe, ttl: float) -> None:
        self._probe = probe
        self.ttl = ttl
        self._lock = asyncio.Lock()
        self._result: bool | None = None
        self._at = 0.0
        self.probes = 0  # how many times the MTA was actually contacted

    async def check(self) -> tuple[bool, float]:
        """(reachable, age of that answer in seconds)."""
        async with self._lock:
            now = time.monotonic()
            if self._result is None or now - self._at >= self.ttl:
                self.probes += 1
                try:
                    async with asyncio.timeout(PROBE_TIMEOUT):
                        self._result = await self._probe()
                except (TimeoutError, OSError):
                    self._result = False
                self._at = time.monotonic()
                metrics.UPSTREAM_UP.set(1 if self._result else 0)
            return self._result, time.monotonic() - self._at


class Health:
    """The status callables of one process, safe to call from any thread.

    `listening` gives the addresses served now, proxy and milter (none: not listening); `probe`
    asks the upstream (`Upstream.probe`), `upstream` names it for the answer.
    """

    def __init__(
        self,
        runtime: Runtime,
        listening: Callable[[], list[str]],
        probe: Callable[[], Awaitable[bool]],
        upstream: str,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.runtime = runtime
        self.listening = listening
        self.upstream_address = upstream
        self.loop = loop
        self.upstream = UpstreamProbe(probe, runtime.config.metrics.probe_interval)

    def live(self) -> Status:
        done = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.loop)
        try:
            done.result(LOOP_TIMEOUT)
        except TimeoutError:
            done.cancel()
            return False, f"event loop did not respond within {LOOP_TIMEOUT:g}s"
        return True, "alive"

    def ready(self) -> Status:
        done = asyncio.run_coroutine_threadsafe(self._ready(), self.loop)
        try:
            return done.result(PROBE_TIMEOUT + LOOP_TIMEOUT)
        except TimeoutError:
            done.cancel()
            return False, "readiness check timed out"

    async def _ready(self) -> Status:
        rt = self.runtime
        lines: list[str] = []
        addresses = self.listening()
        listening = bool(addresses) and not rt.closing
        if listening:
            lines.append("listening: " + ", ".join(addresses))
        else:
            lines.append("listening: no" + (" (shutting down)" if rt.closing else ""))
        policy = rt.policy
        loaded = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(rt.loaded_at))
        checks = len(policy.pipeline.checks)
        line = f"config: hash {policy.digest}, {checks} checks, loaded {loaded}"
        if rt.reload_problems:
            line += "; the last reload was refused (see the log), the previous config runs"
        lines.append(line)
        up, age = await self.upstream.check()
        where = self.upstream_address
        lines.append(
            f"upstream: {where} {'answers' if up else 'does not answer'} (checked {age:.0f}s ago)"
        )
        return listening and up, "\n".join(lines)
