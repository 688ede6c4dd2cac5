"""The capture: one record per transaction, made from what the session driver saw.

`Capture` is built by the composition root when [capture] enabled says so; the
root gives every session driver a `SessionRecorder` as an observer, whatever the
front end (the SMTP proxy, a milter), so recording needs nothing of the front
end. The recorder takes:

* from the driver (`Observer`): each event with its facts as the front end gave
  them (HELO, MAIL and its parameters, each RCPT, DATA, the message), each
  entry's verdict, each reply, and each transaction's end;
* from the resolver and the state store (`recording`): every answer a check
  received on the session's behalf;
* from the session when MAIL comes: the client's facts (address, verified name,
  the HELO names, TLS, the AUTH login), so that a record says what its
  transaction ran under.

While the session runs it only keeps references to these (immutable values:
verdicts, replies, DNS answers) in lists. When the transaction has ended, and the
reply that ended it is known, the transaction waits (`BATCH`, 0.05 s) with the
others that end meanwhile; one callback then turns them all into records
(`RecordMaker`, `encode`: a JSON line each), and the lines go to the writer
thread (`writer.CaptureWriter`), which alone touches the disk. The records are
made on the event loop, not in the writer thread, on purpose: a second thread
working on the same objects costs more CPU than making the record does (their
reference counts travel between cores); made in batches, back to back, they cost
a third to a half of what each would cost alone between two sessions' events (the
processor's caches still hold the code and the encoder); and the session's reply
never waits for any of it. A session refused before any MAIL (at connect or
HELO) is one record too.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import metrics
from ..checks.dkim import DkimResults
from ..checks.dmarc import DmarcResults
from ..checks.spf import SpfHeloResult, SpfResult
from ..config import Config
from ..message import Message
from ..model import Results, Session, Stage
from ..pipeline.check import TransactionEnd
from ..pipeline.observer import Observer
from ..pipeline.verdict import CheckFailures, Verdict
from ..reply import TEMP_UPSTREAM, Reply
from ..resolver import DnsAnswer, DnsError
from . import encode
from .recording import TAPE, Reel
from .settings import CaptureSettings
from .writer import CaptureWriter

if TYPE_CHECKING:
    import dns.name

    from ..pipeline.check import Check
    from ..pipeline.entry import CoreEntry

log = logging.getLogger("spamgate.capture")

# A record is made in a context of its own (nobody's session: no copy made of one).
_NOBODY = contextvars.Context()
# One encoder for every record: json.dumps with these arguments makes a new one
# each time, and a record holds no cycles to look for.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)

# The events whose reply comes after the transaction they ended has ended: the
# record waits for it.
_REPLY_FOLLOWS = frozenset({"mail", "data", "message", "refuse_content"})
# Seconds an ended transaction waits for its record to be made, with the others
# that end meanwhile (the writer's own round is longer: writer.BATCH).
BATCH = 0.05
KEY_FILE = "redact.key"


class _Txn:
    """What one transaction's record is made of: references to values that do not
    change any more (or lists that only grow, with how much of them is this
    transaction's), turned into a record after the transaction has ended."""

    __slots__ = (
        "client",
        "connect",
        "content_refused",
        "data",
        "data_reply",
        "digest",
        "dns",
        "end",
        "end_reply",
        "helos",
        "mail",
        "mail_reply",
        "message",
        "monitor",
        "n",
        "rcpts",
        "results",
        "session",
        "session_marks",
        "session_results",
        "sid",
        "state",
        "time",
        "verdicts",
    )

    def __init__(self, n: int) -> None:
        self.n = n
        self.time = 0.0
        self.sid = ""
        self.digest = ""
        self.monitor = False
        self.client: tuple = ()
        self.helos: tuple[list[list], int] = ([], 0)  # the session's list, and how much
        self.connect: Reply | None = None
        # The session's verdicts, DNS and state lists, and how much of each is ours.
        self.session: tuple[list, list, list] = ([], [], [])
        self.session_marks = (0, 0, 0)
        self.session_results: list[object] = []
        self.mail: tuple | None = None
        self.mail_reply: tuple[Reply | None, str | None] = (None, None)
        self.rcpts: list[list] = []  # [address, params, reply, by]
        self.data = False
        self.data_reply: tuple[Reply | None, str | None] = (None, None)
        self.message: tuple | None = None  # (size, header bytes, content or None, body offset)
        self.content_refused: str | None = None
        self.verdicts: list[tuple[Stage, str, Verdict]] = []
        self.dns: list[tuple] = []
        self.state: list[tuple] = []
        self.end: tuple[str, float] | None = None  # (outcome, score)
        self.end_reply: tuple[Reply | None, str | None] = (None, None)
        self.results: Results | None = None


class SessionRecorder(Observer):
    """One session's recorder (see the module doc); also the `recording.Tape` its
    lookups are written on."""

    __slots__ = (
        "capture",
        "connect_reply",
        "count",
        "digest",
        "ended",
        "event",
        "helos",
        "monitor",
        "recent",
        "reel",
        "s_dns",
        "s_state",
        "s_verdicts",
        "session",
        "txn",
    )

    def __init__(self, capture: Capture, session: Session, digest: str, monitor: bool) -> None:
        self.capture = capture
        self.session = session
        self.digest = digest
        self.monitor = monitor
        self.event = ""
        self.recent: list[Verdict] = []  # the verdicts of the current event
        self.helos: list[list] = []  # [name, esmtp, reply] since connect or STARTTLS
        self.connect_reply: Reply | None = None
        self.s_verdicts: list[tuple[Stage, str, Verdict]] = []  # connect and HELO
        self.s_dns: list[tuple] = []
        self.s_state: list[tuple] = []
        self.txn: _Txn | None = None
        self.ended: _Txn | None = None  # ended; its reply is still to come
        self.count = 0  # records made
        self.reel = Reel(self)  # what the resolver and the store find (TAPE)

    # -- the tape (recording.Tape) -------------------------------------------------------

    def dns(self, name: str | dns.name.Name, rdtype: str, answer: DnsAnswer | DnsError) -> None:
        txn = self.txn
        (txn.dns if txn is not None else self.s_dns).append((name, rdtype, answer))

    def state(self, entry: tuple) -> None:
        txn = self.txn
        (txn.state if txn is not None else self.s_state).append(entry)

    # -- the observer --------------------------------------------------------------------

    def command(self, event: str, args: tuple[object, ...]) -> None:
        if TAPE.get() is not self.reel:
            TAPE.set(self.reel)
        if self.ended is not None:  # ended by the previous event, with no reply to wait for
            self._finish(self.ended)
        self.event = event
        self.recent.clear()
        txn = self.txn
        if event == "rcpt":
            if txn is not None:
                txn.rcpts.append([args[0], args[1], None, None])
        elif event == "mail":
            self._begin(args)
        elif event == "data":
            if txn is not None:
                txn.data = True
        elif event == "message":
            if txn is not None:
                txn.message = _message(args[0])  # type: ignore[arg-type]
        elif event == "helo":
            self.helos.append([args[0], args[1], None])
        elif event == "refuse_content":
            if txn is not None:
                txn.content_refused = str(args[0])
        elif event == "starttls":
            self.helos = []
        elif event == "close":
            if self.count == 0 and txn is None:
                self._refused_session()
            if txn is None:
                self.reel.tape = None  # nothing more to record (see recording.Reel)

    def verdict(
        self, stage: Stage, entry: Check | CoreEntry, verdict: Verdict, seconds: float
    ) -> None:
        self.recent.append(verdict)
        txn = self.txn
        (txn.verdicts if txn is not None else self.s_verdicts).append((stage, entry.label, verdict))

    def reply(self, event: str, reply: Reply | None) -> None:
        by = self._by(event, reply)
        ended = self.ended
        if ended is not None:
            self.ended = None
            ended.end_reply = (reply, by)
            if event == "mail":
                ended.mail_reply = (reply, by)
            elif event == "data":
                ended.data_reply = (reply, by)
            self._finish(ended)
            return
        if event == "connect":
            self.connect_reply = reply
        elif event == "helo" and self.helos:
            self.helos[-1][2] = reply
        txn = self.txn
        if txn is None:
            return
        if event == "mail":
            txn.mail_reply = (reply, by)
            if reply is not None and reply.code >= 400 and self.session.transaction is None:
                # Refused before the transaction began (the size limit): a record still.
                txn.end = ("tempfailed" if reply.code < 500 else "rejected", 0.0)
                txn.end_reply = (reply, by)
                self.txn = None
                self._finish(txn)
        elif event == "rcpt":
            if txn.rcpts:
                txn.rcpts[-1][2:] = [reply, by]
        elif event == "data":
            txn.data_reply = (reply, by)

    def transaction_end(self, event: TransactionEnd) -> None:
        txn = self.txn
        if txn is None:
            return
        self.txn = None
        txn.end = (event.outcome, event.score)
        live = self.session.transaction
        if live is not None:
            txn.results = live.results  # the transaction's: nothing is added after its end
        if self.event in _REPLY_FOLLOWS:
            self.ended = txn
        else:
            self._finish(txn)

    # -- records -------------------------------------------------------------------------

    def _by(self, event: str, reply: Reply | None) -> str | None:
        """Who gave a reply: "us" (an entry's verdict), "link" (the upstream could not
        be reached: 451 4.3.0), or "upstream" (relayed)."""
        if reply is None:
            return None
        if reply.code < 400:  # ours only when a refusal is held (MAIL), or disposed of
            return "upstream"
        if event in ("connect", "helo") or any(v.reply is reply for v in self.recent):
            return "us"
        if reply == TEMP_UPSTREAM:
            return "link"
        return "upstream"

    def _begin(self, args: tuple[object, ...]) -> None:
        self.count += 1
        txn = self.txn = self._txn(self.count)
        txn.mail = args

    def _txn(self, n: int) -> _Txn:
        """A transaction's record begun: what the session has said and been told so far
        (as references: the record is made from them later)."""
        txn = _Txn(n)
        txn.client = _client(self.session)
        txn.helos = (self.helos, len(self.helos))
        txn.connect = self.connect_reply
        txn.session = (self.s_verdicts, self.s_dns, self.s_state)
        txn.session_marks = (len(self.s_verdicts), len(self.s_dns), len(self.s_state))
        return txn

    def _refused_session(self) -> None:
        """A session that ends without a transaction is a record when it was refused
        (at connect or HELO): a candidate rule may let it in."""
        refused = self.connect_reply is not None or any(
            h[2] is not None and h[2].code >= 400 for h in self.helos
        )
        if not refused:
            return
        self.count += 1
        txn = self._txn(0)
        last = self.connect_reply or next(h[2] for h in reversed(self.helos) if h[2] is not None)
        txn.end = ("tempfailed" if last.code < 500 else "rejected", 0.0)
        txn.end_reply = (last, "us")
        self._finish(txn)

    def _finish(self, txn: _Txn) -> None:
        if txn is self.ended:
            self.ended = None
        if self.event == "close":  # the last transaction of the session
            self.reel.tape = None
        txn.time = time.time()
        txn.sid, txn.digest, txn.monitor = self.session.id, self.digest, self.monitor
        # The session's findings change with a new HELO: as they are now.
        txn.session_results = self.session.results.all()
        self.capture.submit(txn)


def _client(session: Session) -> tuple:
    """The client's facts as references (addresses and TLSInfo are not changed once
    set: a front end sets a new TLSInfo; the record writes them out)."""
    c = session.client
    return (
        c.address,
        c.port,
        c.name,
        c.tls,
        c.login,
        session.pregreet,
        c.local_address,
        c.local_port,
    )


def _message(msg: Message) -> tuple:
    """(size, header bytes, the whole content or None, body offset): only what is in
    memory; a message held on disk (larger than [limits] spool_size) is kept as
    its header section and size."""
    content = msg.content if msg.path is None else None
    return (msg.size, msg.header_bytes, content, msg.body_offset)


# -- the record ------------------------------------------------------------------------


class RecordMaker:
    """Turns a finished `_Txn` into a record (on the event loop, `Capture._make`)."""

    def __init__(self, settings: CaptureSettings, key: Callable[[], bytes] | None) -> None:
        self.settings = settings
        self._key = key
        self._redactor: encode.Redactor | None = None

    def redactor(self) -> encode.Redactor | None:
        if self._key is None:
            return None
        if self._redactor is None:
            self._redactor = encode.Redactor(self._key())
        return self._redactor

    def __call__(self, t: _Txn) -> dict[str, Any]:
        r = self.redactor()
        addr = r.address if r is not None else _same
        text = r.text if r is not None else _same
        key = encode.key_shape if r is not None else _same
        address, port, name, tls, login, pregreet, local, local_port = t.client
        rec: dict[str, Any] = {
            "v": encode.FORMAT,
            "t": round(t.time, 3),
            "sid": t.sid,
            "n": t.n,
            "cfg": t.digest,
        }
        if t.monitor:
            rec["mode"] = "monitor"
        if r is not None:
            rec["redacted"] = True
        client: dict[str, Any] = {"address": str(address), "port": port, "name": name}
        if local is not None:
            client["local"] = f"{local}:{local_port}"
        if pregreet:
            client["pregreet"] = True
        if tls is not None:
            client["tls"] = {"version": tls.version, "cipher": tls.cipher, "bits": tls.bits}
        if login is not None:
            client["login"] = r.login(login) if r is not None else login
        helos, count = t.helos
        client["helo"] = [[h[0], h[1], encode.reply(h[2])] for h in helos[:count]]
        rec["client"] = client
        if t.connect is not None:
            rec["connect"] = encode.reply(t.connect)
        if t.mail is not None:
            sender, params, keywords = t.mail
            if r is not None:
                params = [text(x) for x in params]
                keywords = {k: (text(v) if v is not None else None) for k, v in keywords.items()}
            rec["mail"] = {
                "from": addr(sender),
                "params": list(params),
                "keywords": dict(keywords),
                "reply": encode.reply(t.mail_reply[0]),
                "by": t.mail_reply[1],
            }
            rec["rcpt"] = [
                {
                    "to": addr(a),
                    "params": [text(x) for x in ps] if r is not None else list(ps),
                    "reply": encode.reply(rep),
                    "by": by,
                }
                for a, ps, rep, by in t.rcpts
            ]
        if t.data:
            rec["data"] = {"reply": encode.reply(t.data_reply[0]), "by": t.data_reply[1]}
        if t.message is not None:
            rec["message"] = self._message(t.message, r)
        if t.content_refused is not None:
            rec["content_refused"] = t.content_refused
        outcome, score = t.end or ("aborted", 0.0)
        rec["end"] = {
            "outcome": outcome,
            "score": score,
            "reply": encode.reply(t.end_reply[0]),
            "by": t.end_reply[1],
        }
        (verdicts, dns, state), (v, d, s) = t.session, t.session_marks
        rec["verdicts"] = [encode.verdict(*x) for x in (*verdicts[:v], *t.verdicts)]
        rec["dns"] = encode.dns_entries((*dns[:d], *t.dns), t.time)
        rec["state"] = encode.state_entries((*state[:s], *t.state), key)
        results = [*t.session_results, *(t.results.all() if t.results is not None else ())]
        auth = _auth(results)
        if auth:
            rec["auth"] = auth
        failures = [f for x in results if isinstance(x, CheckFailures) for f in x.failed]
        if failures:
            rec["failures"] = [list(f) for f in dict.fromkeys(failures)]
        return rec

    def _message(self, m: tuple, r: encode.Redactor | None) -> dict[str, Any]:
        size, header, content, offset = m
        s = self.settings
        out: dict[str, Any] = {"size": size}
        if content is not None:
            out["sha256"] = hashlib.sha256(memoryview(content)[offset:]).hexdigest()
        cut = len(header) > s.header_size
        if cut:
            header = header[: header.rfind(b"\r\n", 0, s.header_size) + 2]
            out["headers_cut"] = True
        text, encoding = encode.as_text(header)
        out["headers"] = r.text(text) if r is not None else text
        if encoding is not None:
            out["encoding"] = encoding
        if s.store_messages and content is not None and size <= s.message_size and not cut:
            out["body"] = encode.value(bytes(memoryview(content)[offset:]))["@bytes"]
        return out


def _same(x: str) -> str:
    return x


def _auth(results: list[object]) -> dict[str, Any]:
    """SPF, DKIM and DMARC as the checks found them, for `spamgate report` and jq."""
    out: dict[str, Any] = {}
    for x in results:
        kind = type(x)
        if kind is SpfResult:
            out["spf"] = x.result  # type: ignore[attr-defined]
        elif kind is SpfHeloResult:
            out["spf_helo"] = x.result  # type: ignore[attr-defined]
        elif kind is DkimResults:
            out["dkim"] = [[s.result, s.domain] for s in x.signatures]  # type: ignore[attr-defined]
        elif kind is DmarcResults:
            out["dmarc"] = x.result  # type: ignore[attr-defined]
            found = x.results  # type: ignore[attr-defined]
            out["dmarc_dkim_aligned"] = any(d.dkim_aligned for d in found)
            out["dmarc_spf_aligned"] = any(d.spf_aligned for d in found)
    return out


# -- the capture -----------------------------------------------------------------------


class Capture:
    """One process's capture: a recorder per session, one writer thread."""

    def __init__(self, config: Config) -> None:
        settings: CaptureSettings = config.section("capture")
        self.settings = settings
        self.directory = config.resolve_path(settings.directory)
        self.key_file = (
            config.resolve_path(settings.redact_key_file)
            if settings.redact_key_file
            else os.path.join(self.directory, KEY_FILE)
        )
        key = self._key if settings.redact else None
        self.maker = RecordMaker(settings, key)
        self.writer = CaptureWriter(self.directory, settings)
        self._failed_record = False
        self._batch: list[_Txn] = []  # ended transactions whose records are still to make
        self._timer: asyncio.TimerHandle | None = None
        self._room = settings.queue_size  # records waiting, made or not

    def problems(self, config: Config) -> list[str]:
        """What would stop the capture, for `spamgate check`: a directory that cannot
        be made or written, an unreadable key file."""
        out: list[str] = []
        where = config.where()
        probe = self.directory
        while not os.path.exists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            out.append(
                where.at(
                    "capture",
                    "directory",
                    f"[capture] directory: {self.directory}: cannot be written "
                    f"({probe} is not a writable directory)",
                )
            )
        if self.settings.redact and self.settings.redact_key_file:
            try:
                self._read_key()
            except (OSError, ValueError) as exc:
                out.append(where.at("capture", "redact_key_file", f"[capture] {exc}"))
        return out

    def recorder(self, session: Session, digest: str, monitor: bool) -> SessionRecorder:
        return SessionRecorder(self, session, digest, monitor)

    def submit(self, txn: _Txn) -> None:
        """A transaction is over: its record is made with the others that end within
        `BATCH` seconds (one callback for them all; see `_make`)."""
        batch = self._batch
        if not self.writer.accepting or len(batch) + len(self.writer.pending) >= self._room:
            metrics.CAPTURE_RECORDS.labels("dropped").inc()
            return
        batch.append(txn)
        if len(batch) == 1:
            self._timer = asyncio.get_running_loop().call_later(BATCH, self._make, context=_NOBODY)

    def _make(self) -> None:
        """Make the waiting records, one after the other, and hand them to the writer
        together. In a batch the same code and the same encoder run back to back
        while the processor's caches still hold them: a record made alone, between
        two sessions' events, costs about twice as much."""
        batch, self._batch, self._timer = self._batch, [], None
        lines = [line for line in map(self._record, batch) if line is not None]
        if lines:
            self.writer.submit_many(lines)

    def _record(self, txn: _Txn) -> bytes | None:
        """One transaction's line; None (counted as dropped) when it cannot be made."""
        try:
            record = self.maker(txn)
            line = _JSON.encode(record) + "\n"
        except OSError as exc:  # the redaction key could not be read or made
            metrics.CAPTURE_RECORDS.labels("dropped").inc()
            if self.writer.writing:
                self.writer.stop("error", str(exc))
            return None
        except Exception:
            metrics.CAPTURE_RECORDS.labels("dropped").inc()
            if not self._failed_record:  # a bug: said once, not once a message
                self._failed_record = True
                log.exception("capture: a record could not be made (dropped)")
            return None
        return line.encode("utf-8", "surrogateescape")

    def _read_key(self) -> bytes:
        try:
            with open(self.key_file, "rb") as fh:
                key = fh.read().strip()
        except OSError as exc:
            raise OSError(f"redact_key_file: {self.key_file}: {exc.strerror}") from None
        if len(key) < 32:
            raise ValueError(f"redact_key_file: {self.key_file}: shorter than 32 bytes")
        return key

    def _key(self) -> bytes:
        """The redaction key: the configured file's, or redact.key in the directory,
        made (mode 0600) on first use, when the first record is made."""
        if not os.path.exists(self.key_file) and not self.settings.redact_key_file:
            os.makedirs(self.directory, exist_ok=True)
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(secrets.token_hex(32).encode() + b"\n")
        return self._read_key()

    async def aclose(self) -> None:
        """Make the records still waiting, then let the writer write them and close."""
        if self._timer is not None:
            self._timer.cancel()
            self._make()
        await self.writer.aclose()
