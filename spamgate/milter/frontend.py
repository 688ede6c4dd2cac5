"""The milter front end: Postfix reports an SMTP session, the session driver decides.

Postfix keeps port 25 (and postscreen, TLS, AUTH, its own restrictions) and asks
spamgate at each stage; `MilterFrontEnd` turns each event into the same driver
call the SMTP proxy makes, with the facts Postfix gives (the connect event and
the macros), so rules, scores, delayed rejection and monitor mode decide exactly
as in proxy mode. The driver runs with a dry upstream (Postfix is both the server
the client talks to and the place accepted mail goes) and `MtaHold` (HOLD is
Postfix's hold queue), and its replies become milter answers:

* a refusal (4xx or 5xx, ours or a tempfail) is SMFIR_REPLYCODE with spamgate's
  own code, enhanced code and text, which the client sees as is (at RCPT and
  later; Postfix words a refusal at connect itself, docs/milter.md);
* at the end of the message: the header fields spamgate adds are inserted just
  below Postfix's own Received field, where the proxy's land (Postfix adds its
  Received on top of what the proxy relays), forged Authentication-Results
  fields are deleted (SMFIR_CHGHEADER with an empty value, last first), and
  DISCARD and HOLD are SMFIR_DISCARD and SMFIR_QUARANTINE.

The message is rebuilt from the header events (with SMFIP_HDR_LEADSPC the value
keeps everything after the colon, folds as LF) and the body chunks (CRLF, dots
unstuffed): the bytes Postfix queues, below its Received field. It goes into the
same `Spool` as the proxy's DATA, so memory stays bounded by `[limits]
spool_size` whatever the message size; `[limits] message_size` and `header_size`
refuse as in proxy mode. Line length and bare line ends are Postfix's to police
here (it reads the client's bytes, spamgate sees its result).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from collections.abc import Callable

from .. import metrics
from ..app import App
from ..flow.disposal import Disposal, MtaHold
from ..flow.driver import EndOfMessage, SessionDriver
from ..message import render_headers
from ..model import Client, IPAddress, Session, TLSInfo
from ..reply import Reply, default_enhanced
from ..spool import Spool
from ..upstream.dry import DryUpstream
from .codec import (
    Accept,
    ChangeHeader,
    Connect,
    Continue,
    Decision,
    Discard,
    Edit,
    Header,
    Helo,
    InsertHeader,
    Mail,
    Quarantine,
    Rcpt,
    ReplyCode,
    TempFail,
)
from .handler import Macros, MessageDecision, MilterHandler
from .negotiate import Negotiated
from .protocol import Command
from .server import Peer

log = logging.getLogger("spamgate.milter")

# A reply line's room for text: 510 octets less "550 5.7.1 " (and '%' doubled).
_LINE_ROOM = 496
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# What Postfix's macros may bring, kept to what they should be: a verified name
# is a DNS name; a TLS version one of TLS's names (it becomes a metrics label).
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,252})")
_TLS_VERSION = re.compile(r"TLSv1(?:\.[0-3])?|SSLv3")
_CIPHER = re.compile(r"[^A-Za-z0-9_.-]")
# Postfix's own Received field is the first of the message (index 0): ours go
# below it, as they do when the proxy relays to Postfix.
FIRST_INSERT = 1


def new_session_id() -> str:
    return secrets.token_hex(5).upper()


def reply_code(reply: Reply) -> ReplyCode:
    """The milter form of a refusal: the client sees this code, enhanced code and
    text (each line cut to fit an SMTP reply line, at most 32 lines)."""
    code = reply.code
    enhanced = reply.enhanced
    if enhanced is None or enhanced[:1] != str(code)[0]:
        enhanced = default_enhanced(code)
    lines = []
    for line in reply.lines[:32]:
        text = line
        while len(text.replace("%", "%%").encode("utf-8", "surrogateescape")) > _LINE_ROOM:
            text = text[: max(1, len(text) * 9 // 10)]
        lines.append(text)
    return ReplyCode(code, enhanced, tuple(lines))


def answer(reply: Reply | None) -> Decision:
    """A driver reply as the answer to an SMTP-stage event: None or 2xx go on."""
    if reply is None or reply.code < 400:
        return Continue()
    return reply_code(reply)


def field_value(name: str, value: str) -> str:
    """A field's value as the milter protocol carries it: made one safe field by
    `render_headers` (as the proxy writes it), folds as LF plus white space."""
    rendered = render_headers([(name, value)]).decode("utf-8", "surrogateescape")
    return rendered[len(name) + 2 : -2].replace("\r\n", "\n")


def message_answer(end: EndOfMessage) -> MessageDecision:
    """The end of data, decided, as milter edits and the final answer."""
    if end.decision == "refuse" or end.reply.code >= 400:
        return MessageDecision(reply_code(end.reply))
    if end.decision == "discard":
        return MessageDecision(Discard())
    edits: list[Edit] = []
    # Deleting a field shifts the count of the later ones of its name: last first.
    for name, occurrence in sorted(end.removed, key=lambda r: -r[1]):
        edits.append(ChangeHeader(occurrence, name, ""))
    for i, (name, value) in enumerate(end.added):
        edits.append(InsertHeader(FIRST_INSERT + i, name, field_value(name, value)))
    if end.decision == "hold":
        reason = f"spamgate: rule {end.rule}" if end.rule else "spamgate"
        edits.append(Quarantine(_UNSAFE.sub(" ", reason)))
    return MessageDecision(Continue(), tuple(edits))


def keywords(params: tuple[str, ...]) -> dict[str, str | None]:
    """MAIL parameters as the driver takes them: upper-cased keyword to value. A
    SIZE that is not a number is left out (Postfix refused it already)."""
    out: dict[str, str | None] = {}
    for param in params:
        key, eq, value = param.partition("=")
        out[key.upper()] = value if eq else None
    size = out.get("SIZE")
    if size is not None and not (size.isdigit() and len(size) <= 18):
        del out["SIZE"]
    return out


def client_address(event: Connect, macros: Macros) -> IPAddress | None:
    address = event.ip
    if address is None:
        try:
            address = ipaddress.ip_address(macros.get("{client_addr}", ""))
        except ValueError:
            return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address


class MilterGate:
    """The handler factory the milter server calls: one `MilterFrontEnd` per SMTP
    session, all on one application (its policy, services and runtime)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.upstream = DryUpstream(keep=False)
        self.disposal: Disposal = MtaHold()

    def __call__(self, peer: Peer) -> MilterFrontEnd:
        return MilterFrontEnd(self.app, peer, self.upstream, self.disposal)


class MilterFrontEnd(MilterHandler):
    """One SMTP session as Postfix reports it, driven through the session driver."""

    def __init__(self, app: App, peer: Peer, upstream: DryUpstream, disposal: Disposal) -> None:
        self.app = app
        self.peer = peer
        self.upstream = upstream
        self.disposal = disposal
        self.driver: SessionDriver | None = None
        self.session: Session | None = None
        self.admitted: IPAddress | None = None
        self.spool: Spool | None = None
        self.size = 0
        # Which events the MTA waits on (`negotiated`); a refusal found at one it
        # does not wait on is given at the next one it does: connect, HELO and MAIL
        # at RCPT (as delayed rejection does), one in the content at the first of
        # the end of the header and the end of the message that the MTA waits on.
        self.replies_to: Callable[[Command], bool] = _always
        self.refused_session: Decision | None = None  # at connect: every RCPT hears it
        self.early: dict[Command, Decision] = {}  # at HELO or MAIL, for the RCPTs
        self.held: Decision | None = None  # in the content

    def negotiated(self, negotiated: Negotiated) -> None:
        self.replies_to = negotiated.replies_to

    def _envelope(self, command: Command, decision: Decision) -> Decision:
        """Answer, or keep for the RCPTs if the MTA does not wait on `command`."""
        self.early.pop(command, None)
        if isinstance(decision, Continue) or self.replies_to(command):
            return decision
        self.early[command] = decision
        return Continue()

    def _content(self, command: Command, decision: Decision) -> Decision:
        if isinstance(decision, Continue) or self.replies_to(command):
            return decision
        self.held = self.held or decision
        return Continue()

    # -- the session -------------------------------------------------------------------

    async def connect(self, event: Connect, macros: Macros) -> Decision:
        address = client_address(event, macros)
        if address is None:
            # A local client over a unix socket (or no address at all): nothing to
            # look up or score; Postfix's own restrictions apply to it.
            log.info("milter: client %r has no IP address; accepted unchecked", event.address)
            return Accept()
        runtime = self.app.runtime
        refused = runtime.admit(address, frontend="milter")
        if refused is not None:
            metrics.SESSIONS_REFUSED.labels(refused).inc()
            log.info("milter: refused session of [%s]: %s", address, refused)
            return self._refuse_session(TempFail())
        self.admitted = address
        metrics.child(metrics.SESSIONS, "milter").inc()
        port = event.port or _int(macros.get("{client_port}"))
        # Postfix's verified name, or "[address]" when it has none.
        name = event.hostname if _HOSTNAME.fullmatch(event.hostname) else "[UNAVAILABLE]"
        self.session = Session(
            id=new_session_id(),
            client=Client(address=address, port=port, name=name),
            frontend="milter",
        )
        self.driver = self.app.driver(
            self.session, lookup_name=False, upstream=self.upstream, disposal=self.disposal
        )
        decision = answer(await self.driver.connect())
        return decision if isinstance(decision, Continue) else self._refuse_session(decision)

    def _refuse_session(self, decision: Decision) -> Decision:
        """No service for this client: as the proxy after a refused connect, no
        check runs again; the client hears `decision` (at RCPT, if the MTA did not
        wait on connect)."""
        self.refused_session = decision
        return decision if self.replies_to(Command.CONNECT) else Continue()

    async def helo(self, event: Helo, macros: Macros) -> Decision:
        if self.driver is None or self.session is None or self.refused_session is not None:
            return Continue()
        client = self.session.client
        version = macros.get("{tls_version}")
        if version and client.tls is None:
            # The client used STARTTLS: what it said before no longer holds. The
            # version is a metrics label: only the names TLS has, or "unknown".
            await self.driver.starttls()
            bits = _int(macros.get("{cipher_bits}")) or None
            version = version if _TLS_VERSION.fullmatch(version) else "unknown"
            cipher = _CIPHER.sub("", macros.get("{cipher}", ""))[:64]
            client.tls = TLSInfo(version, cipher, bits)
            self.driver.tls_started()
        # Postfix does not say HELO or EHLO; nothing decides on the difference.
        reply = await self.driver.helo(event.name, esmtp=True)
        return self._envelope(Command.HELO, answer(reply))

    async def mail(self, event: Mail, macros: Macros) -> Decision:
        if self.driver is None or self.session is None or self.refused_session is not None:
            return Continue()
        login = _printable(macros.get("{auth_authen}", ""))[:255]
        if login and self.session.client.login is None:
            # Postfix checked the password (SMTP AUTH): as after AUTH through the proxy.
            self.session.client.login = login
            self.session.relay_permitted = True
        reply = await self.driver.mail(event.address, event.params, keywords(event.params))
        return self._envelope(Command.MAIL, answer(reply))

    async def rcpt(self, event: Rcpt, macros: Macros) -> Decision:
        held = self.refused_session or self.early.get(Command.HELO) or self.early.get(Command.MAIL)
        if held is not None:
            return held
        if self.driver is None or self.session is None:
            return Continue()
        if self.session.transaction is None:
            # Only after an answer that never came (a deadline): Postfix refused MAIL.
            return TempFail()
        return answer(await self.driver.rcpt(event.address, event.params))

    async def data(self, macros: Macros) -> Decision:
        if self.driver is None or self.session is None or self.session.transaction is None:
            return Continue() if self.driver is None else TempFail()
        # Postfix's queue id: on the transaction's log line, to find it in Postfix's log
        self.session.transaction.queue_id = macros.get("i", "")
        reply = await self.driver.data()
        if reply is None:
            self._new_spool()
        return answer(reply)

    def _new_spool(self) -> None:
        cfg = self.app.runtime.config
        limits = cfg.limits
        directory = cfg.resolve_path(cfg.server.spool_dir) if cfg.server.spool_dir else None
        self._discard()
        self.spool = Spool(limits.spool_size, directory, limits.header_size)
        self.size = 0

    # -- the message -------------------------------------------------------------------

    async def header(self, event: Header, macros: Macros) -> Decision:
        line = f"{event.name}:{event.value}".replace("\n", "\r\n") + "\r\n"
        decision = await self._write(line.encode("utf-8", "surrogateescape"))
        return self._content(Command.HEADER, decision)

    async def end_of_headers(self, macros: Macros) -> Decision:
        if self.held is not None and self.replies_to(Command.END_OF_HEADERS):
            held, self.held = self.held, None
            return held
        return self._content(Command.END_OF_HEADERS, await self._write(b"\r\n"))

    async def body(self, chunk: bytes, macros: Macros) -> Decision:
        return self._content(Command.BODY, await self._write(chunk))

    async def _write(self, data: bytes) -> Decision:
        spool = self.spool
        if spool is None or self.driver is None:
            return Continue()
        limits = self.app.runtime.config.limits
        self.size += len(data)
        if self.size > limits.message_size:
            return await self._refuse_content("message_too_big")
        await spool.write(data)
        if spool.header_too_big:
            return await self._refuse_content("header_too_big")
        return Continue()

    async def _refuse_content(self, kind: str) -> Decision:
        """Refuse the message now: the client hears this reply at the end of DATA
        (Postfix's message_size_limit is its own). If Postfix waits on this event
        it stops sending the message; if not, it is held for the end."""
        assert self.driver is not None
        self._discard()  # counted by the pipeline, as for the proxy
        return answer(await self.driver.refuse_content(kind))

    async def end_of_message(self, macros: Macros) -> MessageDecision:
        driver = self.driver
        if self.held is not None:
            held, self.held = self.held, None
            return MessageDecision(held)
        if driver is None or self.session is None:
            return MessageDecision(Continue())
        if self.session.transaction is None:
            return MessageDecision(TempFail())
        if self.spool is None:
            self._new_spool()  # DATA was not asked for: an empty message
        spool, self.spool = self.spool, None
        assert spool is not None
        msg = await spool.finish()
        return message_answer(await driver.message(msg))

    # -- endings -----------------------------------------------------------------------

    def _discard(self) -> None:
        self.held = None
        if self.spool is not None:
            self.spool.discard()
            self.spool = None

    async def abort(self) -> None:
        self.early.pop(Command.MAIL, None)
        self._discard()
        if self.driver is not None:
            await self.driver.rset(reason="abort")

    async def close(self, reason: str = "quit") -> None:
        self._discard()
        driver, self.driver = self.driver, None
        try:
            if driver is not None:
                await driver.close(reason)
        finally:
            if self.admitted is not None:
                self.app.runtime.release(self.admitted, frontend="milter")
                self.admitted = None


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)


def _always(command: Command) -> bool:
    return True


def _int(text: str | None) -> int:
    return int(text) if text and text.isdigit() and len(text) < 10 else 0
