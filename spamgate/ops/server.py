"""Listeners, reload and graceful shutdown for one process.

The front ends: the SMTP proxy's listeners (`[server] listen`, `[[listener]]`)
and the milter's sockets (`[milter] listen`), either or both, on one application.

SIGHUP reloads, and so does a change to the config file or any rule file (polled
every `reload_interval` seconds; a change is acted on once the file has stopped
changing for one interval, so a half-written file is not loaded). The new
configuration and every rule table are built and validated before anything
changes; a broken file keeps the running policy, logs each problem as
`file:line: message` and clears the reload-success gauge. SIGTERM stops
accepting, lets sessions finish their transaction within `shutdown_grace`, then
says 421 to the rest (a milter connection still open then is closed: Postfix
applies its milter_default_action to the rest of that session).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable

from .. import metrics
from ..app import App
from ..config import Config, Listener, MilterSettings, parse_milter_address
from ..config.settings import ConfigError, parse_hostport
from ..milter.frontend import MilterGate
from ..milter.negotiate import Needs
from ..milter.protocol import Command
from ..milter.server import Limits, MilterServer
from ..reply import Reply
from ..services import Services
from ..smtp.protocol import SMTPSession
from ..state import StoreUnavailable, state_warnings
from . import daemon
from .daemon import PrivilegeError, StartupError, cannot_listen, drop_privileges
from .descriptors import FdReserve, raise_soft_limit, watermark
from .exporter import Exporter
from .health import Health

log = logging.getLogger("spamgate")


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


# Over a unix socket (no Nagle, no delayed ACKs: bench/milter_noreply.py) Postfix
# need not wait on the events where spamgate's refusal can wait (SMFIP_NR_*):
# connect, HELO and MAIL (their refusals are given at RCPT, as delayed rejection
# gives them), each header field, the end of the header and each body chunk (given
# at the end of the message; milter/frontend.py). Postfix's cleanup server sends
# the content only once the client has sent all of it, so the client hears a
# refusal of the content at the same point either way; the end of the header was
# answered only to spare Postfix sending the body of a message refused in its
# header. Postfix then waits only on RCPT, DATA and the end of the message, and
# talks to the client while spamgate's connect-time lookups run. Over TCP every
# event is answered.
UNIX_NEEDS = Needs(
    no_reply=frozenset(
        {
            Command.CONNECT,
            Command.HELO,
            Command.MAIL,
            Command.HEADER,
            Command.END_OF_HEADERS,
            Command.BODY,
        }
    )
)


def milter_limits(settings: MilterSettings) -> Limits:
    return Limits.for_postfix(settings.command_timeout, settings.content_timeout)


def socket_gid(settings: MilterSettings) -> int:
    """The group id for unix sockets (-1: leave the process's own)."""
    if not settings.socket_group:
        return -1
    try:
        return grp.getgrnam(settings.socket_group).gr_gid
    except KeyError:
        raise StartupError(f'[milter] socket_group: no group "{settings.socket_group}"') from None


def check_unix_free(path: str) -> None:
    """Refuse a socket path another process serves (a second spamgate, a running
    rspamd): replacing it would silently steal its connections. A stale file
    nobody answers on is replaced."""
    if not os.path.exists(path):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return
    raise OSError(errno.EADDRINUSE, "Address already in use")


def remove_unix_sockets(milter: MilterServer) -> None:
    for address in milter.addresses:
        if isinstance(address, str):
            with contextlib.suppress(OSError):
                os.unlink(address)


# What a file looked like when last loaded: (mtime_ns, size, inode), None if missing.
FileState = dict[str, tuple[int, int, int] | None]


def file_state(paths: Iterable[str]) -> FileState:
    out: FileState = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out[path] = None
        else:
            out[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return out


class Server:
    def __init__(
        self,
        app: App,
        *,
        sockets: list[socket.socket] | None = None,
        milter_sockets: list[socket.socket] | None = None,
        exporter: bool = True,
    ) -> None:
        """Serve `app` (built by `app.build`, which says how many workers share the
        limits). `sockets`: one bound, listening socket per listener, and
        `milter_sockets` per `[milter] listen` address (a worker's, from the
        supervisor); None binds them here. `exporter`: serve [metrics] listen here
        (False in workers: the supervisor serves the sum)."""
        self.app = app
        self.config = config = app.config
        watched = file_state(app.sources(config))
        self.runtime = app.runtime
        self._sockets = sockets
        self._milter_sockets = milter_sockets
        self.milter: MilterServer | None = None
        self._serve_metrics = exporter
        self.servers: list[asyncio.base_events.Server] = []
        self.listeners: list[Listener] = []
        self.addresses: list[tuple[str, int]] = []
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.exporter: Exporter | None = None
        self.health: Health | None = None
        # The files behind the running policy (or the last refused attempt), as seen
        # just before they were read: a later change to any of them means reload.
        self._watched: FileState = watched
        self._watcher: asyncio.Task[None] | None = None
        self._fd_reserve: FdReserve | None = None

    @property
    def services(self) -> Services:
        """What the checks use (DNS, the state store): the application's."""
        return self.app.services

    def _factory(self, index: int) -> Callable[[], SMTPSession]:
        # The listener's options are looked up per connection, so a reload can
        # change them for an address that is already bound.
        return lambda: SMTPSession(self.app, self.listeners[index])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.runtime.fd_watermark = watermark(raise_soft_limit(self.config.limits.max_sessions))
        self.listeners = list(self.config.listeners)
        for index, listener in enumerate(self.listeners):
            item = listener.address
            host, port = parse_hostport(item)
            try:
                if self._sockets is not None:
                    server = await loop.create_server(
                        self._factory(index), sock=self._sockets[index], backlog=1024
                    )
                else:
                    server = await loop.create_server(
                        self._factory(index), host, port, reuse_address=True, backlog=1024
                    )
            except OSError as exc:
                await self.close_listeners()
                raise cannot_listen(item, exc) from None
            self.servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                self.addresses.append((name[0], name[1]))
        if self.config.milter.enabled:
            try:
                await self._start_milter(self.config.milter)
            except StartupError:
                await self.close_listeners()
                raise
        self._fd_reserve = FdReserve(self._out_of_fds_reply)
        self._fd_reserve.install(loop, [s for srv in self.servers for s in srv.sockets])
        metrics.RELOAD_OK.set(1)
        if self.config.metrics.listen and self._serve_metrics:
            self._start_exporter(self.config.metrics.listen)
        if self.config.path and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(self.config.path))
        if self.addresses:
            log.info(
                "spamgate listening on %s, upstream %s, mode %s, loop %s",
                ", ".join(f"{h}:{p}" for h, p in self.addresses),
                self.config.upstream.address,
                self.config.server.mode,
                loop_name(loop),
            )
        if self.milter is not None:
            log.info(
                "spamgate milter listening on %s, mode %s, loop %s",
                ", ".join(self.milter_addresses),
                self.config.server.mode,
                loop_name(loop),
            )
        log.info("state store: %s", self.app.services.state.describe())
        for warning in state_warnings(self.config):
            log.warning("%s", warning)
        with contextlib.suppress(StoreUnavailable):  # logged; serving goes on regardless
            await self.app.services.state.ping()

    async def _start_milter(self, settings: MilterSettings) -> None:
        """Listen on every `[milter] listen` address (or serve the sockets given)."""
        milter = MilterServer(
            MilterGate(self.app), limits=milter_limits(settings), unix_needs=UNIX_NEEDS
        )
        self.milter = milter
        if self._milter_sockets is not None:
            for sock in self._milter_sockets:
                await milter.listen_socket(sock)
            return
        for text in settings.listen:
            try:
                address = parse_milter_address(text)
                if address.unix:
                    check_unix_free(address.path)
                    await milter.listen_unix(
                        address.path, int(settings.socket_mode, 8), socket_gid(settings)
                    )
                else:
                    await milter.listen_tcp(address.host, address.port)
            except OSError as exc:
                await milter.close(grace=0)
                self.milter = None
                raise cannot_listen(text, exc) from None

    @property
    def milter_addresses(self) -> list[str]:
        """The milter's addresses as Postfix's smtpd_milters names them."""
        if self.milter is None:
            return []
        return [
            f"unix:{a}" if isinstance(a, str) else f"inet:{a[0]}:{a[1]}"
            for a in self.milter.addresses
        ]

    def _listening(self) -> list[str]:
        proxy = [f"{h}:{p}" for h, p in self.addresses] if self.servers else []
        return proxy + self.milter_addresses

    def _start_exporter(self, listen: str) -> None:
        host, port = parse_hostport(listen)
        self.health = Health(
            self.runtime,
            self._listening,
            self.app.upstream.probe,
            self.config.upstream.address,
            asyncio.get_running_loop(),
        )
        exporter = Exporter(
            host,
            port,
            metrics.scrape_registry(),
            health=self.health.live,
            ready=self.health.ready,
        )
        try:
            exporter.start()
        except OSError as exc:
            for server in self.servers:
                server.close()
            self.servers.clear()
            raise StartupError(f"cannot listen on {listen} for metrics: {exc.strerror}") from None
        self.exporter = exporter
        h, p = exporter.address
        log.info("metrics on http://%s/metrics", f"[{h}]:{p}" if ":" in h else f"{h}:{p}")

    def _out_of_fds_reply(self) -> bytes:
        text = f"{self.runtime.config.hostname} Error: out of resources, try again later"
        return Reply(421, "4.3.2", (text,)).render()

    async def reload(self, path: str | None, *, reason: str = "SIGHUP") -> bool:
        """Load and validate config and tables; swap only if all is well."""
        async with self._reload_lock:
            seen = file_state([path]) if path else {}
            try:
                config = await asyncio.to_thread(self.app.load, path)
                seen = {**file_state(self.app.sources(config)), **seen}
                policy = await asyncio.to_thread(self.app.build_policy, config)
            except ConfigError as exc:
                # Not retried until one of these files changes again.
                self._watched = {**self._watched, **seen}
                self.runtime.reload_problems = list(exc.problems)
                metrics.RELOADS.labels("failure").inc()
                metrics.RELOAD_OK.set(0)
                for problem in exc.problems:
                    log.error("reload refused: %s", problem)
                log.error("reload (%s) refused; still running the previous configuration", reason)
                return False
            if config.metrics != self.config.metrics:
                log.warning("[metrics] changes take effect at the next restart")
            if config.state != self.config.state:
                log.warning("reload: [state] changes take effect only after a restart")
            self._update_listeners(config)
            self._update_milter(config.milter)
            self._watched = seen
            self.runtime.reload_problems = []
            self.runtime.swap(policy)
            metrics.RELOADS.labels("success").inc()
            metrics.RELOAD_OK.set(1)
            log.info(
                "reloaded configuration %s (%s, hash %s)",
                path or "(defaults)",
                reason,
                policy.digest,
            )
            return True

    def _update_listeners(self, config: Config) -> None:
        """Take new options for bound addresses; adding or removing one needs a restart."""
        unmatched = list(config.listeners)
        for index, old in enumerate(self.listeners):
            match = next((lst for lst in unmatched if lst.address == old.address), None)
            if match is None:
                log.warning("reload: still listening on %s until restart", old.address)
                continue
            unmatched.remove(match)
            self.listeners[index] = match
        for lst in unmatched:
            log.warning("reload: not listening on %s: listeners change on restart", lst.address)

    def _update_milter(self, settings: MilterSettings) -> None:
        """New deadlines apply to new milter connections; sockets change on restart."""
        if settings.listen != self.config.milter.listen:
            log.warning("reload: [milter] listen changes take effect at the next restart")
        if self.milter is not None:
            self.milter.limits = milter_limits(settings)

    async def _watch(self, path: str) -> None:
        """Reload when a watched file changed and then stayed the same for one interval."""
        settling: FileState | None = None
        while True:
            interval = self.runtime.config.server.reload_interval
            await asyncio.sleep(interval if interval > 0 else 1.0)
            if interval <= 0:
                continue
            now = file_state(self._watched)
            if now == self._watched:
                settling = None
                continue
            if now != settling:
                settling = now  # still changing, or just changed: look again
                continue
            settling = None
            changed = sorted(p for p in now if now[p] != self._watched.get(p))
            await self.reload(path, reason="changed: " + ", ".join(changed))

    async def close_listeners(self) -> None:
        # Not wait_closed(): from Python 3.12 it waits for every session to end,
        # which is what stop() manages itself, with a grace period.
        for server in self.servers:
            server.close()
        self.servers.clear()
        if self.milter is not None:
            self.milter.stop_listening()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting; let sessions finish within `grace`; 421 to the rest."""
        rt = self.runtime
        if rt.closing:
            await self._stopped.wait()
            return
        rt.closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        grace = self.config.server.shutdown_grace if grace is None else grace
        await self.close_listeners()
        log.info("shutting down: %d sessions open, grace %.0fs", len(rt.sessions), grace)
        deadline = time.monotonic() + grace
        milter = self.milter
        while (rt.sessions or (milter and milter.connections)) and time.monotonic() < deadline:
            for session in list(rt.sessions):
                session.shutdown(force=False)
            await asyncio.sleep(0.05)
        if milter is not None:
            await milter.close(grace=0)
            if self._milter_sockets is None:  # else the supervisor's to remove
                remove_unix_sockets(milter)
        for session in list(rt.sessions):
            session.shutdown(force=True)
        for _ in range(100):
            if not rt.sessions:
                break
            await asyncio.sleep(0.02)
        await self.app.aclose()
        if self._fd_reserve is not None:
            self._fd_reserve.close()
        if self.exporter is not None:
            await asyncio.to_thread(self.exporter.stop)
            self.exporter = None
        self._stopped.set()

    async def serve_forever(
        self,
        path: str | None,
        on_ready: Callable[[Server], None] | None = None,
        *,
        supervised: bool = False,
    ) -> None:
        """Serve until SIGTERM/SIGINT; SIGHUP reloads. `supervised`: a worker under
        spamgate.ops.workers, whose supervisor bound the sockets, dropped root and
        speaks to systemd."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(self._sighup(path, supervised))
        )
        await self.start()
        if not supervised:
            try:
                # Bound to port 25 (as root, or with CAP_NET_BIND_SERVICE): root is
                # no longer needed, and sessions must never run with it.
                drop_privileges(self.config.server.user)
            except PrivilegeError as exc:
                await self.close_listeners()
                raise StartupError(str(exc)) from None
            daemon.notify(f"READY=1\nMAINPID={os.getpid()}")
        if on_ready is not None:
            on_ready(self)
        await stop.wait()
        if not supervised:
            daemon.notify("STOPPING=1")
        await self.stop()

    async def _sighup(self, path: str | None, supervised: bool = False) -> None:
        if not supervised:
            daemon.notify("RELOADING=1")
        try:
            await self.reload(path)
        finally:
            if not supervised:
                daemon.notify("READY=1")
