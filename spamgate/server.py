"""Listeners, reload and graceful shutdown for one process.

SIGHUP reloads: the new configuration and every rule table are built and validated
before anything changes; a broken file keeps the running policy, logs each problem
as `file:line: message` and clears the reload-success gauge. SIGTERM stops
accepting, lets sessions finish their transaction within `shutdown_grace`, then
says 421 to the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from collections.abc import Callable

from . import metrics
from .config import Config, load
from .runtime import Policy, Runtime
from .services import Services
from .settings import ConfigError, parse_hostport
from .smtp.protocol import SMTPSession
from .state import StoreUnavailable

log = logging.getLogger("spamgate")


class StartupError(Exception):
    """A user-facing problem that stops startup (port in use, bad permissions)."""


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.services = Services.build(config)
        self.runtime = Runtime(Policy.build(config, self.services), self.services)
        self.servers: list[asyncio.base_events.Server] = []
        self.addresses: list[tuple[str, int]] = []
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()

    def _factory(self) -> SMTPSession:
        return SMTPSession(self.runtime)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for item in self.config.server.listen:
            host, port = parse_hostport(item)
            try:
                server = await loop.create_server(
                    self._factory, host, port, reuse_address=True, backlog=1024
                )
            except OSError as exc:
                await self.close_listeners()
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(f"cannot listen on {item}: address already in use") from None
                if exc.errno == errno.EACCES:
                    raise StartupError(
                        f"cannot listen on {item}: permission denied (ports below 1024 need "
                        "root or CAP_NET_BIND_SERVICE)"
                    ) from None
                raise StartupError(f"cannot listen on {item}: {exc.strerror}") from None
            self.servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                self.addresses.append((name[0], name[1]))
        metrics.RELOAD_OK.set(1)
        log.info(
            "spamgate listening on %s, upstream %s, mode %s",
            ", ".join(f"{h}:{p}" for h, p in self.addresses),
            self.config.upstream.address,
            self.config.server.mode,
        )
        log.info("state store: %s", self.services.state.describe())
        with contextlib.suppress(StoreUnavailable):  # logged; serving goes on regardless
            await self.services.state.ping()

    async def reload(self, path: str | None) -> bool:
        """Load and validate config and tables; swap only if all is well."""
        async with self._reload_lock:
            try:
                config = await asyncio.to_thread(load, path)
                policy = await asyncio.to_thread(Policy.build, config, self.services)
            except ConfigError as exc:
                metrics.RELOADS.labels("failure").inc()
                metrics.RELOAD_OK.set(0)
                for problem in exc.problems:
                    log.error("reload refused: %s", problem)
                log.error("reload refused; still running the previous configuration")
                return False
            if config.state != self.config.state:
                log.warning("reload: [state] changes take effect only after a restart")
            self.runtime.swap(policy)
            metrics.RELOADS.labels("success").inc()
            metrics.RELOAD_OK.set(1)
            log.info("reloaded configuration %s (hash %s)", path or "(defaults)", policy.digest)
            return True

    async def close_listeners(self) -> None:
        # Not wait_closed(): from Python 3.12 it waits for every session to end,
        # which is what stop() manages itself, with a grace period.
        for server in self.servers:
            server.close()
        self.servers.clear()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let sessions finish within `grace`; 421 to the rest."""
        rt = self.runtime
        if rt.closing:
            await self._stopped.wait()
            return
        rt.closing = True
        grace = self.config.server.shutdown_grace if grace is None else grace
        await self.close_listeners()
        log.info("shutting down: %d sessions open, grace %.0fs", len(rt.sessions), grace)
        deadline = time.monotonic() + grace
        while rt.sessions and time.monotonic() < deadline:
            for session in list(rt.sessions):
                session.shutdown(force=False)
            await asyncio.sleep(0.05)
        for session in list(rt.sessions):
            session.shutdown(force=True)
        for _ in range(100):
            if not rt.sessions:
                break
            await asyncio.sleep(0.02)
        await self.services.aclose()
        self._stopped.set()

    async def serve_forever(
        self, path: str | None, on_ready: Callable[[Server], None] | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload(path)))
        await self.start()
        if on_ready is not None:
            on_ready(self)
        await stop.wait()
        await self.stop()
