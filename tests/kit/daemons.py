"""Private clamd, spamd and rspamd on loopback, from Debian's packages, for the tests.

Each runs in the foreground as a child of the test process, with a configuration
written into its own temporary directory, on a free port, and nothing from the
system's configuration or data that is not read-only:

* clamd: a DatabaseDirectory holding only a signature database the test writes
  (`SIGNATURE` anywhere in a scanned file; clamd decodes MIME, so a base64
  attachment carrying it is found). No freshclam, no download.
* spamd: SpamAssassin's rules as Debian ships them (/usr/share/spamassassin, no
  sa-update), local tests only (-L), no Bayes, no auto-learning, no user config.
* rspamd: a minimal configuration of its own (`rspamd/` beside this file): the
  normal worker on a free port, no Redis, no modules that need the network, and
  the GTUBE test pattern enabled.

The tests share one instance of each per session (starting them takes seconds).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from .ports import free_port

CLAMD = "/usr/sbin/clamd"
SPAMD = "/usr/sbin/spamd"
RSPAMD = "/usr/bin/rspamd"
SA_RULES = "/usr/share/spamassassin"

# The string the tests' clamd signature finds, and the name clamd reports.
SIGNATURE = "SPAMGATE-TEST-ANTIVIRUS-SIGNATURE-5d2f9c"
SIGNATURE_NAME = "Spamgate.Test.Signature.UNOFFICIAL"


def _wait_tcp(port: int, proc: subprocess.Popen, timeout: float, what: str, log: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}): {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} in {timeout:g}s: {_tail(log)}")


def _tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return " | ".join(fh.read().splitlines()[-8:])
    except OSError:
        return "(no log)"


class Daemon:
    """A child process in its own process group, stopped with the whole group."""

    what = "daemon"

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"spamgate-{self.what}-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = os.path.join(self.dir, f"{self.what}.log")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        finally:
            out.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Clamd(Daemon):
    what = "clamd"

    def __init__(self, stream_max: str = "25M") -> None:
        super().__init__()
        self.socket = os.path.join(self.dir, "clamd.sock")
        db = os.path.join(self.dir, "db")
        os.makedirs(db)
        # .ndb: Name:TargetType (0: any file):Offset (*: anywhere):hex of the bytes
        with open(os.path.join(db, "spamgate-test.ndb"), "w") as fh:
            fh.write(f"Spamgate.Test.Signature:0:*:{SIGNATURE.encode().hex()}\n")
        self.conf = os.path.join(self.dir, "clamd.conf")
        with open(self.conf, "w") as fh:
            fh.write(
                f"Foreground yes\nLogFile {self.log}\nLogTime yes\nDatabaseDirectory {db}\n"
                f"OfficialDatabaseOnly no\nBytecode no\nLocalSocket {self.socket}\n"
                f"LocalSocketMode 666\nTCPSocket {self.port}\nTCPAddr 127.0.0.1\n"
                f"MaxThreads 4\nReadTimeout 30\nCommandReadTimeout 5\nIdleTimeout 30\n"
                f"StreamMaxLength {stream_max}\nSelfCheck 3600\nScanMail yes\n"
                "ScanArchive yes\nScanHTML yes\n"
            )

    @property
    def unix(self) -> str:
        return f"unix:{self.socket}"

    def start(self) -> Clamd:
        self._spawn([CLAMD, f"--config-file={self.conf}"])
        assert self.proc is not None
        _wait_tcp(self.port, self.proc, 60, "clamd", self.log)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.socket) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self


class Spamd(Daemon):
    what = "spamd"

    def start(self) -> Spamd:
        home = os.path.join(self.dir, "home")
        os.makedirs(home)
        argv = [
            SPAMD, f"--listen=127.0.0.1:{self.port}", "-A", "127.0.0.1", "-4",
            f"--configpath={SA_RULES}", "-x", "-L", "-H", home,
            "--max-children=2", "--min-children=1", "--min-spare=1", "--max-spare=1",
            "--timeout-child=60", "-s", "stderr",
            "--cf=use_bayes 0", "--cf=bayes_auto_learn 0", "--cf=dns_available no",
            "--cf=use_auto_whitelist 0", "--cf=required_score 5.0",
        ]  # fmt: skip
        if os.geteuid() == 0:
            os.chown(home, 65534, 65534)  # children run as nobody
            argv += ["-u", "nobody"]
        self._spawn(argv, env={**os.environ, "HOME": home})
        assert self.proc is not None
        # spamd compiles the shipped rule set before it listens: seconds
        _wait_tcp(self.port, self.proc, 120, "spamd", self.log)
        return self


RSPAMD_CONF = """\
options {{
  pidfile = "{dir}/rspamd.pid";
  dns {{ nameserver = ["127.0.0.1:{dns_port}"]; timeout = 1s; retransmits = 1; }}
  filters = "";
  gtube_patterns = "all";
  disable_hyperscan = true;
  local_addrs = [];
  map_watch_interval = 1h;
}}
logging {{ type = "file"; filename = "{dir}/rspamd.log"; level = "warning"; }}
worker "normal" {{
  bind_socket = "127.0.0.1:{port}";
  count = 1;
  task_timeout = 20s;
}}
actions {{
  reject = 15;
  add_header = 6;
  greylist = 4;
}}
"""


class Rspamd(Daemon):
    what = "rspamd"

    def start(self) -> Rspamd:
        conf = os.path.join(self.dir, "rspamd.conf")
        with open(conf, "w") as fh:
            fh.write(RSPAMD_CONF.format(dir=self.dir, port=self.port, dns_port=free_port()))
        argv = [RSPAMD, "-f", "-c", conf, f"--var=DBDIR={self.dir}", f"--var=RUNDIR={self.dir}"]
        argv += [f"--var=LOGDIR={self.dir}", "--insecure"]
        self._spawn(argv)
        assert self.proc is not None
        _wait_tcp(self.port, self.proc, 60, "rspamd", self.log)
        return self
