"""Several worker processes (`[server] workers = N`): one supervisor, N servers.

One Python process runs on one core; a bigger machine is used by running several.
The supervisor binds every listener once per worker, with SO_REUSEPORT, so the
kernel spreads new connections evenly over the workers' sockets (a milter's unix
socket is bound once, and the workers take turns accepting on it); then it drops
root (ports below 1024 are bound by then) and forks the workers, each a complete
`Server` on its own event loop with its own sockets. It never serves mail itself:

* SIGHUP is forwarded (each worker reloads and validates on its own, as one
  process does); the supervisor loads the configuration too, for workers it starts
  later;
* SIGTERM and SIGINT are forwarded, and the supervisor waits for the workers to
  finish their sessions (`shutdown_grace`) before it exits;
* a worker that dies is started again on the same sockets (connections the
  kernel queued for it meanwhile wait in its backlog), sooner or later depending
  on how quickly it died;
* systemd hears READY=1 from the supervisor (NotifyAccess=main) once every worker
  listens;
* with `[metrics] listen`, the supervisor serves /metrics, the sum over all
  workers (prometheus_client's multiprocess mode, set up before the first fork),
  and /readyz, ready while every worker serves.

Limits are counted by each worker for its own sessions: `max_sessions` is shared
out (each worker takes its part), `sessions_per_client` applies per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import pwd
import select
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import app, metrics
from ..config import Config, parse_milter_address
from ..config.settings import ConfigError, parse_hostport
from . import daemon
from .daemon import PrivilegeError, StartupError, cannot_listen, drop_privileges
from .exporter import Exporter
from .server import Server, check_unix_free, socket_gid

log = logging.getLogger("spamgate")

BACKLOG = 1024
READY_TIMEOUT = 60.0
# A worker that dies sooner than this after its start is restarted with a growing
# delay (1, 2, 4 ... 30 s); one that lived longer, at once.
QUICK_DEATH = 10.0
MAX_RESTART_DELAY = 30.0


def bind_listeners(config: Config, copies: int) -> list[list[socket.socket]]:
    """For each listener, `copies` sockets bound to the same address (SO_REUSEPORT)."""
    bound: list[list[socket.socket]] = []
    try:
        for listener in config.listeners:
            bound.append(_bind_copies(*parse_hostport(listener.address), copies))
    except OSError as exc:
        close_all(bound)
        raise cannot_listen(listener.address, exc) from None
    return bound


def bind_milter(config: Config, copies: int) -> list[list[socket.socket]]:
    """For each `[milter] listen` address, `copies` sockets: TCP ones bound with
    SO_REUSEPORT like the proxy's; a unix socket bound once (with its mode and
    group) and shared, `copies` times the same socket."""
    bound: list[list[socket.socket]] = []
    settings = config.milter
    try:
        for text in settings.listen:
            address = parse_milter_address(text)
            if not address.unix:
                bound.append(_bind_copies(address.host, address.port, copies))
                continue
            check_unix_free(address.path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bound.append([sock] * copies)
            sock.bind(address.path)
            os.chmod(address.path, int(settings.socket_mode, 8))
            gid = socket_gid(settings)
            if gid >= 0:
                os.chown(address.path, -1, gid)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        close_all(bound)
        raise cannot_listen(text, exc) from None
    return bound


def _bind_copies(host: str, port: int, copies: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    address = _probe(family, address)
    group: list[socket.socket] = []
    try:
        for _ in range(copies):
            sock = socket.socket(family, socket.SOCK_STREAM)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            # port 0: the others take the port the first one got
            address = sock.getsockname()[:2] if family == socket.AF_INET else sock.getsockname()
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in group:
            sock.close()
        raise
    return group


def close_all(groups: list[list[socket.socket]]) -> None:
    for group in groups:
        for sock in group:
            sock.close()


def _names(groups: list[list[socket.socket]]) -> list[str]:
    out = set()
    for group in groups:
        for sock in group:
            name = sock.getsockname()
            out.add(f"unix:{name}" if isinstance(name, str) else f"{name[0]}:{name[1]}")
    return sorted(out)


def _probe(family: int, address: tuple) -> tuple:
    """Bind once without SO_REUSEPORT: fails if anyone (another spamgate included)
    holds the address, which SO_REUSEPORT alone would share with them silently.
    Returns the address with the port the kernel chose for port 0."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)
        return probe.getsockname()[:2] if family == socket.AF_INET else probe.getsockname()


@dataclass
class Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    failures: int = 0  # quick deaths in a row
    restart_at: float | None = None
    ready_fd: int = -1


@dataclass
class Supervisor:
    config: Config
    path: str | None
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    checks: app.Checks = app.DEFAULT_CHECKS
    workers: list[Worker] = field(default_factory=list)
    sockets: list[list[socket.socket]] = field(default_factory=list)
    milter_sockets: list[list[socket.socket]] = field(default_factory=list)
    _signals: list[int] = field(default_factory=list)
    _stopping: bool = False
    _metrics_dir: str | None = None
    _exporter: Exporter | None = None

    # -- startup -------------------------------------------------------------------

    def run(self) -> int:
        count = self.config.server.workers
        daemon.raise_fd_limit(self.config.limits.max_sessions)
        self.sockets = bind_listeners(self.config, count)
        try:
            self.milter_sockets = bind_milter(self.config, count)
        except StartupError:
            close_all(self.sockets)
            raise
        if self.config.metrics.listen:
            self._metrics_dir = _metrics_directory(self.config.server.user)
            metrics.enable_multiprocess(self._metrics_dir)
        drop_privileges(self.config.server.user)
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.workers = [Worker(i) for i in range(count)]
        for worker in self.workers:
            self._spawn(worker)
        if not self._wait_ready():
            self._stop_all()
            return 1
        addresses = _names(self.sockets) + _names(self.milter_sockets)
        log.info(
            "spamgate supervisor: %d workers (pids %s) on %s",
            count,
            ", ".join(str(w.pid) for w in self.workers),
            ", ".join(addresses),
        )
        if self.config.metrics.listen and not self._start_exporter():
            self._stop_all()
            return 1
        daemon.notify(f"READY=1\nMAINPID={os.getpid()}")
        try:
            return self._supervise(wake_r)
        finally:
            signal.set_wakeup_fd(-1)
            if self._exporter is not None:
                self._exporter.stop()
            metrics.remove_multiprocess_files()

    def _start_exporter(self) -> bool:
        """/metrics (the sum over the workers), /healthz and /readyz, served here."""
        host, port = parse_hostport(self.config.metrics.listen)
        exporter = Exporter(
            host, port, metrics.scrape_registry(), health=self._live, ready=self._ready
        )
        try:
            exporter.start()
        except OSError as exc:
            log.error("cannot listen on %s for metrics: %s", self.config.metrics.listen, exc)
            return False
        self._exporter = exporter
        h, p = exporter.address
        log.info("metrics on http://%s/metrics (all workers)", f"{h}:{p}")
        return True

    def _live(self) -> tuple[bool, str]:
        return True, f"supervisor of {len(self.workers)} workers"

    def _ready(self) -> tuple[bool, str]:
        down = [w.index for w in self.workers if not w.pid or w.ready_fd >= 0]
        if down or self._stopping:
            return False, "stopping" if self._stopping else f"workers not serving: {down}"
        return True, f"{len(self.workers)} workers serving"

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = {w.ready_fd: w for w in self.workers}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                log.error("workers did not start within %.0fs", READY_TIMEOUT)
                return False
            readable, _, _ = select.select(list(pending), [], [], min(left, 0.5))
            for fd in readable:
                worker = pending.pop(fd)
                ok = os.read(fd, 1) == b"1"
                os.close(fd)
                worker.ready_fd = -1
                if not ok:
                    log.error("worker %d (pid %d) failed to start", worker.index, worker.pid)
                    return False
        return True

    # -- workers --------------------------------------------------------------------

    def _spawn(self, worker: Worker) -> None:
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            code = 1
            try:
                code = self._work(worker.index, ready_w)
            except BaseException:  # pragma: no cover - logged, then the process ends
                log.exception("worker %d failed", worker.index)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(ready_w)
        worker.pid, worker.started, worker.ready_fd = pid, time.monotonic(), ready_r
        worker.restart_at = None

    def _work(self, index: int, ready_fd: int) -> int:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _die_with_parent()
        mine = [group[index] for group in self.sockets]
        milter = [group[index] for group in self.milter_sockets]
        keep = {id(sock) for sock in mine + milter}
        for group in self.sockets + self.milter_sockets:
            for sock in group:
                if id(sock) not in keep:
                    sock.close()

        async def main() -> int:
            try:
                built = app.build(self.config, checks=self.checks, share=len(self.workers))
                server = Server(built, sockets=mine, milter_sockets=milter, exporter=False)
            except ConfigError as exc:
                for problem in exc.problems:
                    log.error("worker %d: %s", index, problem)
                os.write(ready_fd, b"0")
                return 1

            def ready(_: Server) -> None:
                os.write(ready_fd, b"1")
                os.close(ready_fd)

            await server.serve_forever(self.path, on_ready=ready, supervised=True)
            return 0

        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            return runner.run(main())

    # -- the supervisor's loop --------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._signals.append(signum)

    def _supervise(self, wake_fd: int) -> int:
        while True:
            with contextlib.suppress(InterruptedError):
                select.select([wake_fd], [], [], 0.5)
            with contextlib.suppress(BlockingIOError):
                os.read(wake_fd, 512)
            while self._signals:
                signum = self._signals.pop(0)
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._stop_all()
                    return 0
                if signum == signal.SIGHUP:
                    self._reload()
            self._reap()
            self._restart_due()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is None:
                continue
            lived = time.monotonic() - worker.started
            worker.failures = worker.failures + 1 if lived < QUICK_DEATH else 0
            delay = (
                0.0
                if worker.failures == 0
                else min(MAX_RESTART_DELAY, 2.0 ** (worker.failures - 1))
            )
            log.warning(
                "worker %d (pid %d) ended (%s) after %.0fs; starting it again in %.0fs",
                worker.index,
                pid,
                _status(status),
                lived,
                delay,
            )
            metrics.worker_exited(pid)
            worker.pid = 0
            worker.restart_at = time.monotonic() + delay
            if worker.ready_fd >= 0:
                os.close(worker.ready_fd)
                worker.ready_fd = -1

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.pid == 0 and worker.restart_at is not None and now >= worker.restart_at:
                self._refresh_config()
                self._spawn(worker)
                log.info("worker %d started again (pid %d)", worker.index, worker.pid)
            if worker.ready_fd >= 0:
                readable, _, _ = select.select([worker.ready_fd], [], [], 0)
                if readable:
                    os.read(worker.ready_fd, 1)
                    os.close(worker.ready_fd)
                    worker.ready_fd = -1

    def _refresh_config(self) -> None:
        """The file as it is now, if it is valid: what the running workers have too."""
        if self.path is None:
            return
        try:
            config = app.load(self.path, self.checks)
        except ConfigError as exc:
            log.warning("supervisor: %s; a new worker keeps the last good configuration", exc)
            return
        if config.listeners != self.config.listeners:
            log.warning("supervisor: listeners change on restart only")
        self.config = config

    def _reload(self) -> None:
        daemon.notify("RELOADING=1")
        self._refresh_config()
        for worker in self.workers:
            if worker.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)
        daemon.notify("READY=1")

    def _stop_all(self) -> None:
        self._stopping = True
        daemon.notify("STOPPING=1")
        live = [w for w in self.workers if w.pid]
        for worker in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.server.shutdown_grace + 10
        while live and time.monotonic() < deadline:
            for worker in list(live):
                with contextlib.suppress(ChildProcessError):
                    pid, _ = os.waitpid(worker.pid, os.WNOHANG)
                    if pid == 0:
                        continue
                live.remove(worker)
                metrics.worker_exited(worker.pid)
                worker.pid = 0
            time.sleep(0.05)
        for worker in live:
            log.warning("worker %d (pid %d) did not stop; killed", worker.index, worker.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
        paths = [n[5:] for n in _names(self.milter_sockets) if n.startswith("unix:")]
        close_all(self.sockets + self.milter_sockets)
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        log.info("spamgate supervisor: stopped")


def _metrics_directory(user: str) -> str:
    """A private directory for the workers' metric files (prometheus_client's
    multiprocess mode), writable by the user the workers run as."""
    directory = tempfile.mkdtemp(
        prefix="spamgate-metrics-", dir=os.environ.get("RUNTIME_DIRECTORY") or None
    )
    if user and os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            pw = pwd.getpwnam(user)
            os.chown(directory, pw.pw_uid, pw.pw_gid)
    return directory


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _die_with_parent() -> None:
    """Linux: SIGTERM the worker if the supervisor dies (kill -9, a crash)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the supervisor is already gone
        sys.exit(0)


def run(
    config: Config,
    path: str | None,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None,
    checks: app.Checks = app.DEFAULT_CHECKS,
) -> int:
    """`spamgate run` with workers > 1; the process's exit status."""
    try:
        return Supervisor(config, path, loop_factory, checks).run()
    except (StartupError, PrivilegeError) as exc:
        print(f"spamgate: {exc}", file=sys.stderr)
        return 1
