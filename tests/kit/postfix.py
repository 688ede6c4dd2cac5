"""A private Postfix instance for integration tests: own config, queue, log and port.

Nothing here touches /etc/postfix or the system's Postfix: `postfix -c DIR` runs a
separate master(8) with its own queue under a temporary directory, listening on one
loopback port chosen at start. It accepts mail for `example.test` and delivers it
to one Maildir; everything else bounces into the `error` transport, and no DNS is
ever used, so a test can never send mail off the machine.

The defaults are what spamgate's documentation asks of the Postfix behind it:
XCLIENT allowed from loopback, and `smtpd_forbid_bare_newline = reject` with an
*empty* exclusion list (the default `$mynetworks` would exempt the proxy itself;
postconf(5), smtpd_forbid_bare_newline_exclusions). Tests that check shipped
Postfix snippets pass their own lines: `main_extra` (main.cf lines) is merged into
main.cf, adding parameters or replacing the defaults above, `smtpd_options` adds
`-o name=value` to the listener, and `listener` replaces the listener line(s) of
master.cf outright.

Postfix 3.7.11 (Debian 12) supports everything used here; see docs/postfix.md for
which releases support which `smtpd_forbid_bare_newline` values.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .ports import free_port

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
DOMAIN = "example.test"
HOSTNAME = "mx.example.test"
# Recipients in DOMAIN with this local part are unknown (550 5.1.1 from Postfix).
UNKNOWN_USER = "nobody"


class PostfixError(Exception):
    """The instance would not start (bad config, port taken); carries the log tail."""


def parse_main_cf(text: Iterable[str] | str) -> dict[str, str]:
    """`name = value` lines (main.cf syntax: comments, indented continuations)."""
    lines = text.splitlines() if isinstance(text, str) else list(text)
    params: dict[str, str] = {}
    name: str | None = None
    for raw in lines:
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            if name is None:
                raise PostfixError(f"continuation line without a parameter: {raw!r}")
            params[name] = f"{params[name]} {raw.strip()}".strip()
            continue
        key, sep, value = raw.partition("=")
        if not sep or not key.strip():
            raise PostfixError(f"not a main.cf line: {raw!r}")
        name = key.strip()
        params[name] = value.strip()
    return params


def main_cf(base: Path) -> dict[str, str]:
    """The default main.cf, as ordered parameter → value."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": f"{base}/spool",
        "data_directory": f"{base}/data",
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        # Distinct names, so that logs of parallel instances cannot be confused.
        "syslog_name": f"postfix-{base.name}",
        "maillog_file": f"{base}/postfix.log",
        "maillog_file_prefixes": str(base),
        "myhostname": HOSTNAME,
        "mydomain": DOMAIN,
        "myorigin": "$mydomain",
        "mydestination": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        # Only the proxy's own address: after XCLIENT the real client (127.0.0.5 in
        # the tests) is a stranger to Postfix, as a real client would be.
        "mynetworks": "127.0.0.1/32",
        "relay_domains": "",
        "relayhost": "",
        "virtual_mailbox_domains": DOMAIN,
        "virtual_mailbox_base": f"{base}/mail",
        "virtual_mailbox_maps": f"regexp:{base}/etc/vmailbox",
        "virtual_uid_maps": "static:65534",
        "virtual_gid_maps": "static:65534",
        "default_transport": "error:test instance has no outbound delivery",
        "relay_transport": "error:test instance has no outbound delivery",
        "smtpd_peername_lookup": "no",
        "smtp_dns_support_level": "disabled",
        "smtp_host_lookup": "native",
        "lmtp_host_lookup": "native",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        # What spamgate asks of the Postfix behind it.
        "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
        "smtpd_forbid_bare_newline": "reject",
        "smtpd_forbid_bare_newline_exclusions": "",
        "smtpd_banner": "$myhostname ESMTP spamgate-test-postfix",
        "biff": "no",
        "append_dot_mydomain": "no",
        "notify_classes": "",
        # Below spamgate's default (10240000), so a test can make Postfix refuse
        # a message that spamgate let through, without sending 10 MB.
        "message_size_limit": "1048576",
    }


# The listener; {host} and {port} are filled in. No chroot: the queue is not /var.
LISTENER = "{host}:{port} inet n - n - - smtpd"
SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class PostfixInstance:
    """One private Postfix. Use as a context manager, or start()/stop()."""

    main_extra: Iterable[str] | str = ()
    smtpd_options: Mapping[str, str] = field(default_factory=dict)
    listener: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    start_timeout: float = 20.0
    # postconf warnings (unknown parameters, typos) fail the start: a test of a
    # shipped snippet should not pass because Postfix ignored half of it.
    strict: bool = True
    base: Path = field(init=False)

    def __post_init__(self) -> None:
        # Not pytest's tmp_path: that sits under a 0700 directory, and Postfix's
        # unprivileged daemons (virtual delivers as nobody) must reach the files.
        self.base = Path(tempfile.mkdtemp(prefix="sg-postfix-", dir="/tmp"))
        self.base.chmod(0o755)
        self.port = self.port or free_port(self.host)

    # -- paths ---------------------------------------------------------------------

    @property
    def etc(self) -> Path:
        return self.base / "etc"

    @property
    def maildir(self) -> Path:
        """The Maildir every example.test recipient is delivered to."""
        return self.base / "mail" / "catchall"

    @property
    def log_path(self) -> Path:
        return self.base / "postfix.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # -- configuration ---------------------------------------------------------------

    def main_cf_text(self) -> str:
        params = main_cf(self.base)
        # Merged rather than appended: Postfix would take the later value too, but
        # warns "overriding earlier entry", which strict mode treats as an error.
        params.update(parse_main_cf(self.main_extra))
        lines = ["# generated by tests/kit/postfix.py", *(f"{k} = {v}" for k, v in params.items())]
        return "\n".join(lines) + "\n"

    def master_cf_text(self) -> str:
        if self.listener is not None:
            listener = self.listener.format(host=self.host, port=self.port)
        else:
            listener = LISTENER.format(host=self.host, port=self.port)
            for name, value in self.smtpd_options.items():
                listener += f"\n  -o {name}={value}"
        return f"# generated by tests/kit/postfix.py\n{listener}\n{SERVICES}"

    def write_config(self) -> None:
        self.etc.mkdir(exist_ok=True)
        for sub in ("spool", "data", "mail"):
            (self.base / sub).mkdir(exist_ok=True)
        shutil.chown(self.base / "data", "postfix", "postfix")
        shutil.chown(self.base / "mail", "nobody", "nogroup")
        (self.etc / "main.cf").write_text(self.main_cf_text())
        (self.etc / "master.cf").write_text(self.master_cf_text())
        # Every example.test address has a mailbox, except UNKNOWN_USER's.
        (self.etc / "vmailbox").write_text(f"!/^{UNKNOWN_USER}@/ catchall/\n")
        # Postfix re-reads a table whose mtime is under a second old, sleeping 300 ms
        # each time ("file is being changed"); dating the files back saves seconds.
        past = time.time() - 5
        for name in ("main.cf", "master.cf", "vmailbox"):
            os.utime(self.etc / name, (past, past))

    # -- running ---------------------------------------------------------------------

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)

    def postconf(self, *args: str) -> str:
        """`postconf -c ETC ARGS`: the effective configuration, for assertions."""
        out = self._run(POSTCONF, "-c", str(self.etc), *args)
        if out.returncode != 0:
            raise PostfixError(f"postconf {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout

    def start(self) -> PostfixInstance:
        self.write_config()
        check = self._run(POSTCONF, "-c", str(self.etc), "-n")
        warnings = [line for line in check.stderr.splitlines() if "warning" in line]
        if check.returncode != 0 or (self.strict and warnings):
            raise PostfixError(f"postconf rejects the configuration:\n{check.stderr}")
        for step in ("check", "start"):
            out = self._run(POSTFIX, "-c", str(self.etc), step)
            if out.returncode != 0:
                raise PostfixError(
                    f"postfix {step} failed ({out.returncode}):\n{out.stderr}{self.log_tail()}"
                )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._greets():
                return self
            time.sleep(0.05)
        self.stop()
        raise PostfixError(f"postfix did not answer on {self.address}\n{self.log_tail()}")

    def _greets(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as s:
                s.settimeout(2)
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
                return banner.startswith(b"220 ")
        except OSError:
            return False

    def master_pid(self) -> int | None:
        try:
            text = (self.base / "spool" / "pid" / "master.pid").read_text()
        except OSError:
            return None
        digits = text.strip()
        return int(digits) if digits.isdigit() else None

    def stop(self) -> None:
        """What `postfix stop` does (SIGTERM to our master), without its 1 s sleeps."""
        pid = self.master_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)  # master leads its own process group

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixInstance:
        try:
            return self.start()
        except BaseException:
            self.cleanup()  # the error carries the log tail
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- what happened -----------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """The first log match for `pattern` (a regex), waiting for it to appear."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(self.log_text())
            if match or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if match is None:
            raise AssertionError(f"no log line matches {pattern!r}; log ends:\n{self.log_tail()}")
        return match

    def delivered(self) -> list[bytes]:
        """Every message in the Maildir, oldest first."""
        new = self.maildir / "new"
        if not new.is_dir():
            return []
        files = sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [f.read_bytes() for f in files]

    def wait_delivered(self, marker: bytes, timeout: float = 20.0) -> bytes:
        """The one delivered message containing `marker`, waiting for delivery."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.delivered() if marker in m]
            if found or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if len(found) != 1:
            raise AssertionError(
                f"{len(found)} messages contain {marker!r}; log ends:\n{self.log_tail()}"
            )
        return found[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (we are not master's parent: postfix forks it).
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
