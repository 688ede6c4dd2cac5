"""Hostile-session fuzzing: generated SMTP sessions over a real socket, with invariants.

A spamgate, a recording sink and a DNS server run on one event loop in a
background thread; the fuzzer drives them with blocking sockets, one session per
example, on one of three listeners: plain SMTP, one that expects a PROXY header,
and one with STARTTLS and AUTH passthrough. Header and body rules are on (with
PREPEND rules that copy client text into a header), and SPF, DKIM, DMARC, links
(dbl.test lists listed.test) and attachments, so the MIME decoder, the regexp
engine, the HTML parser and the archive reader see hostile content too (the
checks that need a daemon have their own tests). After each session it checks the
promises spamgate makes to the internet:

* every reply is a well-formed SMTP reply;
* the server neither crashes (no error logged, no 421 "internal error") nor hangs
  past its timeouts;
* the upstream holds exactly the messages whose final dot got a 2xx, each once;
  a message whose dot was sent but whose reply the client never read may be
  there or not (that window is inherent to SMTP), but at most once;
* nothing the client sent changes the meaning of what goes upstream: one
  attribute of each name per XCLIENT, ADDR the real client (the PROXY source),
  LOGIN only after a 235, NAME/HELO/LOGIN in xtext; no CR/LF/NUL inside a
  command; MAIL/RCPT carry one path and known parameters only; headers spamgate
  prepends are well-formed fields of known names (no injection through CR/LF);
* no relay: a client outside mynetworks that did not authenticate never gets a
  recipient outside relay_domains to the upstream, nor one whose local part
  routes elsewhere (user%host, host!user, "user@host"); domains compare as ASCII
  (a Kelvin sign is not a "k").

The same runner replays the regression corpus (tests/corpus/*.smtp), so a case
found by the fuzzer becomes plain test data.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trustme

from spamgate.app import build, loads
from spamgate.ops.server import Server
from tests.kit.dnsserver import DnsServer
from tests.kit.sink import Sink

REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9](?:[ -][\x20-\x7e\x80-\xff\t]*)?\r\n$")
MARKER = re.compile(rb"X-Fuzz-Id: (\d+)")
XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")
PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=[\x21-\x3c\x3e-\x7e\x80-\U0010ffff]+)?$")
# "FROM:<path>" or "TO:<path>": one path, a quoted local part may hold "<" or ">".
UPSTREAM_PATH = re.compile(r'((?:FROM|TO):<(?:"(?:[^"\\]|\\.)*"|[^<>"])*>)')
MAIL_KEYWORDS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID"}
RCPT_KEYWORDS = {"NOTIFY", "ORCPT"}
# Header fields spamgate itself may prepend (the rules below add the X-Fuzz- ones).
OUR_HEADERS = {
    "authentication-results",
    "received",
    "x-spam-flag",
    "x-spam-score",
    "x-spam-symbols",
    "x-fuzz-subject",
    "x-fuzz-body",
}
FIELD = re.compile(rb"^[!-9;-~]+: [^\x00-\x08\x0a-\x1f\x7f]*\r\n$")
CONTINUATION = re.compile(rb"^[ \t][^\x00-\x08\x0a-\x1f\x7f]*\r\n$")
FOLDED = {"received", "authentication-results"}  # our fields that may be folded
LEAD = b"lead-fold.test"  # in the fuzzer's first lines that start with white space
# An Authentication-Results value that names gate.test (the authserv-id), after
# one optional comment, in the spellings the fuzzer forges: quoted, with a root
# dot, cut by a control character, as an RFC 2047 encoded-word.
CLAIMS_US = re.compile(
    rb'^\s*(?:\([^()]*\)\s*)?(?:=\?[^?]*\?q\?)?"?gate\.test\.*(?![\w.-])', re.IGNORECASE
)
AR_NAME = re.compile(rb"^authentication-results[ \t]*:", re.IGNORECASE)
MYNETWORKS = ipaddress.ip_network("127.0.0.1/32")
LOCAL_DOMAINS = {"example.test", "bank.test"}
ACCOUNT = ("alice", "s3cret")

HEADER_RULES = r"""
/^Subject: .*reject-me/             REJECT
/^Subject: (.*)$/                   PREPEND X-Fuzz-Subject: $1
/^Content-Type: .*name="?([^"]*)/   SCORE 0.5 FUZZ_ATTACHMENT
"""
BODY_RULES = r"""
/reject-me/                         REJECT
/^(a|aa)+$/                         SCORE 1 FUZZ_BACKTRACK
/^(.*)prepend-me(.*)$/              PREPEND X-Fuzz-Body: $1$2
/viagra/                            SCORE 6 FUZZ_SPAM
"""

FUZZ_CONFIG = """
[server]
listen = ["127.0.0.1:0"]
hostname = "gate.test"
relay_domains = ["example.test", "bank.test"]
mynetworks = ["127.0.0.1/32"]
proxy_protocol_timeout = 1
reload_interval = 0

[[listener]]
address = "127.0.0.1:0"
proxy_protocol = true

[[listener]]
address = "127.0.0.1:0"
auth_passthrough = true

[tls]
cert_file = "{cert}"
key_file = "{key}"

[upstream]
address = "{sink}"
command_timeout = 5
data_timeout = 5

[dns]
nameservers = ["{dns}"]
timeout = 0.5
lifetime = 1.0

[limits]
message_size = 200000
recipients = 20
idle_timeout = 2
data_timeout = 2
errors = 12
max_sessions = 200
sessions_per_client = 50

[attachments]
enabled = true
action = "score"

[uribl]
sites = ["dbl.test"]
symbols = {{ URIBL_T = "multi.test*1" }}
ip_sites = ["ipbl.test"]

[spf]
enabled = true

[dkim]
enabled = true

[dmarc]
enabled = true
bad_from = "score"

[rules]
header = ["regexp:header.regexp"]
body = ["regexp:body.regexp"]
regexp_timeout = 0.05

[scoring]
tag = 5.0

[milter]
listen = ["inet:127.0.0.1:0"]
command_timeout = 6
content_timeout = 6
"""

# Reverse names for PROXY sources in 203.0.113.0/24: one good, the rest hostile.
HOSTILE_PTR = {
    "1": "mail.good.test.",
    "2": "evil\\032ADDR=10.0.0.1.good.test.",
    "3": "a+b.good.test.",
    "4": "x\\013y.good.test.",
    "5": "[unavailable].good.test.",
}


class ErrorLog(logging.Handler):
    """Counts records at ERROR and above, and any record with a traceback, from
    spamgate, asyncio and aiosmtpd: each is a crash (no client input may raise)."""

    LOGGERS = ("spamgate", "asyncio", "mail.log")

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info or record.stack_info:
            self.records.append(self.format(record))


class MilterLog(logging.Handler):
    """The milter server's warnings (protocol violations, each with its peer)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage())


class Harness:
    """spamgate + sink + DNS on a private loop in a thread, for blocking-socket clients."""

    def __init__(self, config: str = FUZZ_CONFIG) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.sink = Sink()
        self.sink.behaviour.accounts = {ACCOUNT[0]: ACCOUNT[1]}
        self.dns = DnsServer()
        self.server: Server | None = None
        self.port = self.proxy_port = self.tls_port = 0
        self._dir = tempfile.TemporaryDirectory(prefix="sg-fuzz-")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self.errors = ErrorLog()
        self.milter_log = MilterLog()
        self.milter_port = 0
        self.stats = {
            "sessions": 0,
            "accepted": 0,  # messages told 2xx (each found upstream once)
            "unknown": 0,  # dot sent, reply never read (client hung up)
            "authenticated": 0,  # sessions that got 235
            "tls": 0,  # sessions that completed STARTTLS
            "unanswered": 0,  # sessions closed without a word (bad PROXY header)
            "crashes": 0,
        }
        ca = trustme.CA()
        self.client_tls = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ca.configure_trust(self.client_tls)
        leaf = ca.issue_cert("gate.test")
        directory = Path(self._dir.name)
        self.cert, self.key = directory / "gate.crt", directory / "gate.key"
        leaf.private_key_pem.write_to_path(str(self.key))
        self.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        (directory / "header.regexp").write_text(HEADER_RULES)
        (directory / "body.regexp").write_text(BODY_RULES)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self._ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        await self.sink.start()
        await self.dns.start()
        self.dns.zone("113.0.203.in-addr.arpa", {k: {"PTR": v} for k, v in HOSTILE_PTR.items()})
        self.dns.zone("dbl.test", {"listed.test": {"A": "127.0.0.2"}})
        self.dns.zone(
            "good.test",
            {
                "mail": {"A": "203.0.113.1"},
                "evil\\032ADDR=10.0.0.1": {"A": "203.0.113.2"},
                "a+b": {"A": "203.0.113.3"},
            },
        )
        text = self.config.format(
            sink=self.sink.address, dns=self.dns.address, cert=self.cert, key=self.key
        )
        path = Path(self._dir.name) / "spamgate.toml"
        path.write_text(text)
        self.server = Server(build(loads(text, str(path))))
        await self.server.start()
        ports = [port for _host, port in self.server.addresses]
        self.port, self.proxy_port, self.tls_port = ports[0], ports[1], ports[2]
        assert self.server.milter is not None
        self.milter_port = self.server.milter.addresses[0][1]  # type: ignore[index]
        for name in ErrorLog.LOGGERS:
            logging.getLogger(name).addHandler(self.errors)
        logging.getLogger("spamgate.milter").addHandler(self.milter_log)

    def start(self) -> Harness:
        self._thread.start()
        self._ready.wait(20)
        return self

    def call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        for name in ErrorLog.LOGGERS:
            logging.getLogger(name).removeHandler(self.errors)
        logging.getLogger("spamgate.milter").removeHandler(self.milter_log)
        if self.server is not None:
            self.call(self.server.stop(grace=0.2))
        self.call(self.sink.stop())
        self.call(self.dns.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self._dir.cleanup()
        report = os.environ.get("FUZZ_REPORT")
        if report:
            with open(report, "a") as fh:
                fh.write(json.dumps(self.stats) + "\n")

    def sessions_open(self) -> int:
        """Sessions still open: the proxy's, and the milter's connections."""
        assert self.server is not None
        milter = self.server.milter.connections if self.server.milter is not None else 0
        return len(self.server.runtime.sessions) + milter


@dataclass
class Transcript:
    sent: list[bytes] = field(default_factory=list)
    replies: list[bytes] = field(default_factory=list)  # raw reply lines
    accepted_ids: set[int] = field(default_factory=set)  # X-Fuzz-Id told 2xx after dot
    unknown_ids: set[int] = field(default_factory=set)  # dot sent, reply never read
    closed_by_server: bool = False
    greeted: bool = False
    authenticated: bool = False  # a 235 was seen
    tls: bool = False  # STARTTLS completed


class Violation(AssertionError):
    pass


class Closed(Exception):
    """The server closed the connection; `replies` arrived before it did."""

    def __init__(self, replies: list[list[bytes]]) -> None:
        super().__init__("closed")
        self.replies = replies


def _read_replies(
    sock: socket.socket, buf: bytearray, deadline: float, expect: int | None = None
) -> list[list[bytes]]:
    """Read replies until `expect` of them arrived (or, with None, a quiet spell).

    Raises Closed when the server closes, Violation when it stops mid-reply or
    leaves expected replies unsent past the deadline (a hang).
    """
    replies: list[list[bytes]] = []
    current: list[bytes] = []
    while True:
        while b"\r\n" in buf:
            idx = buf.index(b"\r\n") + 2
            line = bytes(buf[:idx])
            del buf[:idx]
            current.append(line)
            if len(line) >= 4 and line[3:4] != b"-":
                replies.append(current)
                current = []
        if expect is not None and len(replies) >= expect:
            return replies
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if expect is not None:
                raise Violation(f"server hung: {len(replies)} of {expect} replies")
            return replies
        try:
            sock.settimeout(remaining if expect is not None else min(0.15, remaining))
            data = sock.recv(65536)
        except TimeoutError:
            if expect is None:
                return replies
            continue
        except OSError:
            raise Closed(replies) from None
        if not data:
            if buf or current:
                raise Violation(f"server closed in the middle of a reply: {bytes(buf)!r}")
            raise Closed(replies)
        buf += data
        if b"\r\n" not in buf and len(buf) > 4096:
            raise Violation(f"overlong reply fragment: {bytes(buf[:100])!r}")


def run_session(
    port: int,
    steps: list[tuple[str, bytes]],
    *,
    idle: float = 2.0,
    tls: ssl.SSLContext | None = None,
    source: str | None = None,
) -> Transcript:
    """Play `steps`; check reply syntax as we go and note which messages got a 2xx.

    Kinds: "proxy" (a PROXY header, first, before the greeting), "send" (command
    bytes, possibly several pipelined), "data" (message content ending in
    CRLF.CRLF, with one X-Fuzz-Id header), "starttls" (the command, then the
    handshake on 220), "data_close" (message content, then hang up without
    reading the reply), "partial" (bytes, then hang up), "close" (hang up).
    A message counts as accepted when its content was sent right after a 354 and
    the first reply after it is 2xx.
    """
    t = Transcript()
    sock: socket.socket = socket.create_connection(
        ("127.0.0.1", port), timeout=5, source_address=(source, 0) if source else None
    )
    buf = bytearray()
    last_code = b""
    try:
        if steps and steps[0][0] == "proxy":
            sock.sendall(steps[0][1])
            steps = steps[1:]
        try:
            _check(t, _read_replies(sock, buf, time.monotonic() + 3, expect=1))
        except Closed as closed:
            _check(t, closed.replies)
            t.closed_by_server = True
            return t
        t.greeted = t.replies[-1][:3] == b"220"
        last_code = t.replies[-1][:3] if t.replies else b""
        for kind, data in steps:
            if kind == "close":
                break
            after_354 = last_code == b"354"
            try:
                sock.sendall(data)
            except OSError:
                t.closed_by_server = True
                break
            t.sent.append(data)
            if kind == "partial":
                break
            if kind == "data_close":
                if after_354:
                    t.unknown_ids.update(int(m) for m in MARKER.findall(data))
                break
            if kind == "data" and after_354:
                expect: int | None = 1
            elif kind == "data":
                expect = None  # content read as commands: no fixed count
            else:
                expect = data.count(b"\n")
            try:
                replies = _read_replies(sock, buf, time.monotonic() + idle + 1.5, expect)
            except Closed as closed:
                replies = closed.replies
                t.closed_by_server = True
            _check(t, replies)
            if kind == "data" and after_354:
                if not replies:
                    t.unknown_ids.update(int(m) for m in MARKER.findall(data))
                elif replies[0][-1][:1] == b"2":
                    t.accepted_ids.update(int(m) for m in MARKER.findall(data))
            if replies:
                last_code = replies[-1][-1][:3]
            if any(r[-1][:3] == b"235" for r in replies):
                t.authenticated = True
            if t.closed_by_server:
                break
            if kind == "starttls" and last_code == b"220" and tls is not None and not buf:
                try:
                    sock = tls.wrap_socket(sock, server_hostname="gate.test")
                    t.tls = True
                except (OSError, ssl.SSLError) as exc:
                    raise Violation(f"STARTTLS handshake failed: {exc}") from None
    finally:
        sock.close()
    return t


def _check(t: Transcript, replies: list[list[bytes]]) -> None:
    for reply in replies:
        code = reply[0][:3]
        for line in reply:
            if not REPLY_LINE.match(line):
                raise Violation(f"malformed reply line {line!r}")
            if line[:3] != code:
                raise Violation(f"mixed codes in one reply {reply!r}")
            if b"internal error" in line:
                raise Violation(f"the session failed on a bug: {line!r}")
        t.replies.extend(reply)


def check_upstream(sink: Sink, accepted_before: int, transcript: Transcript) -> None:
    """The sink holds exactly the messages the client was told 2xx for, each once;
    those whose reply was never read may be there, once."""
    new = sink.messages[accepted_before:]
    got: list[int] = []
    for m in new:
        ids = MARKER.findall(m.content)
        if len(ids) != 1:
            raise Violation(f"upstream message without exactly one fuzz id: {m.content[:200]!r}")
        got.append(int(ids[0]))
        check_prepended(m.content)
        check_auth_results(m.content)
    if len(got) != len(set(got)):
        raise Violation(f"upstream got a message twice: {sorted(got)}")
    extra = set(got) - transcript.accepted_ids - transcript.unknown_ids
    if extra:
        raise Violation(f"upstream got messages the client was not told 2xx for: {extra}")
    if transcript.accepted_ids - set(got):
        raise Violation(f"client told 2xx but upstream lacks: {transcript.accepted_ids - set(got)}")


def check_prepended(content: bytes) -> None:
    """What spamgate put before the client's content is well-formed fields of our own,
    and nothing the client sent continues one of them: content that starts with
    white space comes after an empty line (all of it body)."""
    if LEAD in content.split(b"\r\n\r\n", 1)[0]:
        raise Violation(f"the client's white-space lead continues our header: {content!r}")
    start = content.find(b"X-Fuzz-Id: ")
    if 0 <= content.find(LEAD) < start:  # after the empty line we put before it
        start = content.find(b"\r\n\r\n") + 2
        if content[start + 2 : start + 3] not in (b" ", b"\t"):
            raise Violation(f"an empty line before content that needs none: {content!r}")
    prefix = content[:start]
    current = None
    for line in prefix.split(b"\r\n")[:-1]:
        line += b"\r\n"
        if line[:1] in (b" ", b"\t") and current in FOLDED:
            if not CONTINUATION.match(line):
                raise Violation(f"bad continuation line in a prepended header: {line!r}")
            continue
        if not FIELD.match(line):
            raise Violation(f"malformed prepended header line: {line!r}")
        current = line.split(b":", 1)[0].decode().lower()
        if current not in OUR_HEADERS:
            raise Violation(f"header injected before the message: {line!r}")


def check_auth_results(content: bytes) -> None:
    """One Authentication-Results field claims to be ours, and it is ours (first,
    before the client's content): forged ones were removed (RFC 8601 §5)."""
    head = content.split(b"\r\n\r\n", 1)[0]
    fields = re.split(rb"\r\n(?![ \t])", head)
    ours = [
        i
        for i, f in enumerate(fields)
        if AR_NAME.match(f) and CLAIMS_US.match(re.sub(rb"\r\n[ \t]", b" ", f.split(b":", 1)[1]))
    ]
    if ours != [0]:
        raise Violation(f"Authentication-Results claiming gate.test at fields {ours}: {head!r}")


def check_commands(
    commands: list[str], *, addr: str = "127.0.0.1", relay: bool = True, login: bool = False
) -> None:
    """No upstream command line carries injected structure.

    `addr` is the XCLIENT ADDR the real client must have; `relay` whether it may
    relay; `login` whether it authenticated (and so may carry LOGIN).
    """
    for cmd in commands:
        if "\r" in cmd or "\n" in cmd or "\x00" in cmd:
            raise Violation(f"control character in upstream command {cmd!r}")
        if cmd.startswith("XCLIENT "):
            _check_xclient(cmd, addr, login)
        if cmd.startswith(("MAIL ", "RCPT ")):
            verb = cmd[:4]
            m = UPSTREAM_PATH.match(cmd[5:])
            if m is None:
                raise Violation(f"path without brackets upstream: {cmd!r}")
            path, params = m.group(1), cmd[5 + m.end() :]
            allowed = MAIL_KEYWORDS if verb == "MAIL" else RCPT_KEYWORDS
            for param in params.split():
                m = PARAM.match(param)
                if m is None or m.group(1).upper() not in allowed:
                    raise Violation(f"unexpected parameter upstream: {cmd!r}")
            if verb == "RCPT" and not relay:
                _relay_check(path[len("TO:<") : -1], cmd)


def _relay_check(mailbox: str, cmd: str) -> None:
    """A recipient of a client that may not relay: postmaster, or a mailbox in one
    of our domains (ASCII comparison) whose local part names no other host."""
    if mailbox.isascii() and mailbox.lower() == "postmaster":
        return
    local, _, domain = mailbox.rpartition("@")
    if not domain.isascii() or domain.lower().rstrip(".") not in LOCAL_DOMAINS:
        raise Violation(f"relayed for a client that may not relay: {cmd!r}")
    if local.startswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    if set(local) & set("@%!"):
        raise Violation(f"routed for a client that may not relay: {cmd!r}")


def _check_xclient(cmd: str, addr: str, login: bool) -> None:
    attrs = cmd.split()[1:]
    if any("=" not in a for a in attrs):
        raise Violation(f"XCLIENT attribute injection: {cmd!r}")
    values = dict(a.split("=", 1) for a in attrs)
    if len(values) != len(attrs):
        raise Violation(f"XCLIENT attribute injection: {cmd!r}")
    if values.get("ADDR") != addr:
        raise Violation(f"XCLIENT ADDR not the real client {addr}: {cmd!r}")
    if "LOGIN" in values and not login:
        raise Violation(f"XCLIENT LOGIN without a successful AUTH: {cmd!r}")
    if "LOGIN" in values and values["LOGIN"] != ACCOUNT[0]:
        raise Violation(f"XCLIENT LOGIN is not the authenticated user: {cmd!r}")
    for key in ("NAME", "HELO", "LOGIN"):
        value = values.get(key)
        if value is None or value in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
            continue
        if not XTEXT.match(value):
            raise Violation(f"XCLIENT {key} is not xtext: {cmd!r}")
    if values.get("PROTO", "SMTP") not in ("SMTP", "ESMTP"):
        raise Violation(f"XCLIENT PROTO: {cmd!r}")
    if not values.get("PORT", "0").isdigit():
        raise Violation(f"XCLIENT PORT: {cmd!r}")


def xclient_addr(address: str) -> str:
    ip = ipaddress.ip_address(address)
    return f"IPV6:{ip.compressed}" if ip.version == 6 else ip.compressed


def may_relay(address: str) -> bool:
    return ipaddress.ip_address(address) in MYNETWORKS


def auth_plain(user: str, password: str) -> bytes:
    return base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode())


@contextlib.contextmanager
def no_error_logged(h: Harness):
    """A session that logs an error (a bug, an unhandled exception) is a crash."""
    before = len(h.errors.records)
    yield
    new = h.errors.records[before:]
    if new:
        h.stats["crashes"] += 1
        raise Violation("error logged during the session:\n" + "\n".join(new))


# -- the milter socket ------------------------------------------------------------------

MILTER_RESPONSES = frozenset(b"acdrtyhimqOsp")


@dataclass
class MilterTranscript:
    responses: list[tuple[bytes, bytes]] = field(default_factory=list)
    closed: bool = False  # the server closed the connection
    rest: bytes = b""  # bytes that are no whole response


def run_milter(port: int, stream: bytes, *, wait: float = 8.0) -> MilterTranscript:
    """Send `stream` to the milter, close our side, read every response until the
    server closes (within `wait` seconds: it must, whatever it was sent)."""
    t = MilterTranscript()
    buf = bytearray()
    deadline = time.monotonic() + wait
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        try:
            for i in range(0, len(stream), 4096):
                sock.sendall(stream[i : i + 4096])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed on us mid-stream: a violation it saw early
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            except OSError:
                t.closed = True
                break
            if not data:
                t.closed = True
                break
            buf += data
    while len(buf) >= 5:
        length = int.from_bytes(buf[:4], "big")
        if len(buf) < 4 + length:
            break
        t.responses.append((bytes(buf[4:5]), bytes(buf[5 : 4 + length])))
        del buf[: 4 + length]
    t.rest = bytes(buf)
    return t


def check_milter_responses(t: MilterTranscript) -> None:
    """Every response is a whole packet of a known kind, and the server closed."""
    if not t.closed:
        raise Violation("the milter connection was not closed after the MTA's side was")
    if t.rest:
        raise Violation(f"a response cut short: {t.rest!r}")
    for code, data in t.responses:
        if code[0] not in MILTER_RESPONSES:
            raise Violation(f"unknown response {code!r} {data!r}")
        if code == b"y" and not re.match(rb"^[45]\d\d[ -]", data):
            raise Violation(f"reply code response {data!r}")
