"""Running as a system service: dropping root, telling systemd, logging to the journal.

Under the shipped systemd unit spamgate never is root: it binds port 25 with
CAP_NET_BIND_SERVICE. Started as root any other way (an init script, a container,
by hand), it binds its listeners and then becomes `[server] user`, so that a flaw
in the SMTP code never runs with root's rights. The systemd notification protocol
(sd_notify(3)) is a datagram on a Unix socket; it is written here rather than
pulled in as a dependency because it is one `sendto`.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import pwd
import resource
import socket
import sys

log = logging.getLogger("spamgate")


class StartupError(Exception):
    """A user-facing problem that stops startup (port in use, bad permissions)."""


def cannot_listen(item: str, exc: OSError) -> StartupError:
    """What to tell the admin when binding `item` failed, in one line."""
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"cannot listen on {item}: address already in use")
    if exc.errno == errno.EACCES and item.startswith("unix:"):
        return StartupError(
            f"cannot listen on {item}: permission denied (the socket's directory must "
            "be writable by the service user)"
        )
    if exc.errno == errno.EACCES:
        return StartupError(
            f"cannot listen on {item}: permission denied (ports below 1024 need "
            "root or CAP_NET_BIND_SERVICE)"
        )
    return StartupError(f"cannot listen on {item}: {exc.strerror}")


# Modules the standard library and our dependencies import lazily, on first use.
# They are loaded while still root, in case the service user cannot read the
# Python installation (a virtualenv under /root, say).
_PRELOAD = (
    "concurrent.futures.thread",  # asyncio.to_thread
    "encodings.idna",  # host names in getaddrinfo
    "dns._asyncio_backend",  # dnspython picks its async backend on first query
    "sniffio",
    "dns.rdtypes.IN.A",
    "dns.rdtypes.IN.AAAA",
    "dns.rdtypes.ANY.CNAME",
    "dns.rdtypes.ANY.MX",
    "dns.rdtypes.ANY.NS",
    "dns.rdtypes.ANY.PTR",
    "dns.rdtypes.ANY.SOA",
    "dns.rdtypes.ANY.TXT",
)


class PrivilegeError(Exception):
    """The configured user cannot be switched to (unknown user, failed setuid)."""


def drop_privileges(user: str) -> None:
    """Become `user` (its uid, primary gid and supplementary groups) if we are root."""
    if os.geteuid() != 0:
        if user:
            log.debug("not started as root; [server] user %s is not needed", user)
        return
    if not user:
        log.warning("running as root: set [server] user to drop privileges after binding")
        return
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"[server] user {user}: no such user") from None
    if pw.pw_uid == 0:
        raise PrivilegeError(f"[server] user {user}: is root")
    for name in _PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    try:
        # Groups first: once the uid is gone, so is the right to change them.
        os.initgroups(user, pw.pw_gid)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except OSError as exc:
        raise PrivilegeError(f"[server] user {user}: cannot switch: {exc.strerror}") from None
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - would mean the kernel ignored setuid
        raise PrivilegeError(f"[server] user {user}: could regain root")
    log.info("running as user %s (uid %d, gid %d)", user, pw.pw_uid, pw.pw_gid)
    stdlib = os.path.dirname(os.__file__)
    if not os.access(stdlib, os.R_OK | os.X_OK):
        log.warning(
            "user %s cannot read the Python installation (%s): install spamgate where "
            "it can (e.g. a virtualenv in /opt/spamgate), or modules loaded later will fail",
            user,
            stdlib,
        )


def notify(state: str) -> bool:
    """Send an sd_notify(3) state ("READY=1", "RELOADING=1", ...); False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", address.lstrip("\0"), exc)
        return False
    return True


def on_journal() -> bool:
    """True when stderr is the journal (systemd sets JOURNAL_STREAM to its dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`: the journal keeps the level, and adds the time."""

    def __init__(self, name: str = "%(name)s") -> None:
        super().__init__(f"{name}: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # One journal entry per record: continuation lines (tracebacks) keep the level.
        return "\n".join(f"<{priority}>{line}" for line in text.splitlines())


# Descriptors a process needs besides its sessions (listeners, logs, DNS, pool).
FD_MARGIN = 256


def raise_fd_limit(max_sessions: int) -> None:
    """Raise the open-files limit to its hard maximum; warn if even that is too low.

    A session holds two descriptors (client and upstream), so 5,000 sessions need
    10,000 and more: far above the usual soft limit of 1,024, which would turn a
    spam run into "too many open files" on accept.
    """
    needed = 2 * max_sessions + FD_MARGIN
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = needed if hard == resource.RLIM_INFINITY else hard
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    except (OSError, ValueError) as exc:  # a sandbox that forbids it (systemd: LimitNOFILE)
        log.debug("cannot raise the open-files limit: %s", exc)
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-files limit %d is below the %d that [limits] max_sessions = %d needs "
            "(two per session); raise it (systemd: LimitNOFILE=)",
            soft,
            needed,
            max_sessions,
        )
