"""An in-process upstream MTA for tests, built on aiosmtpd, that records what it got.

It speaks real SMTP on a loopback port, offers XCLIENT like Postfix, accepts the DSN
parameters verbatim, and can be told to fail: a given reply at MAIL, RCPT, DATA or
the final dot, a delay before a reply, or a dropped connection in the middle of DATA.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from dataclasses import dataclass, field

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

# spamgate's own Authentication-Results field, first in every relayed message.
_AR_FIRST = re.compile(rb"\AAuthentication-Results: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*")


@dataclass
class Received:
    """One message as the sink got it."""

    mail_from: str
    mail_params: list[str]
    rcpt_tos: list[str]
    rcpt_params: list[list[str]]
    content: bytes
    xclient: list[str]  # XCLIENT argument lines in force for this session
    helo: str | None
    tls: bool = False  # the session with the sink was encrypted (upstream STARTTLS)
    login: str | None = None  # user name authenticated with AUTH on this session
    size: int = 0  # bytes of content, unstuffed (kept even when the content is not)
    digest: str = ""  # its SHA-256, hex

    @property
    def original(self) -> bytes:
        """The content without the Authentication-Results field spamgate puts first:
        what the client sent, plus any other headers spamgate added."""
        return _AR_FIRST.sub(b"", self.content, count=1)


@dataclass
class SinkBehaviour:
    # Command name ("MAIL", "RCPT", "DATA", "DOT", "XCLIENT", "EHLO") -> reply line.
    replies: dict[str, str] = field(default_factory=dict)
    # Command name -> seconds to wait before answering.
    delays: dict[str, float] = field(default_factory=dict)
    # Close the connection after reading this many bytes of message content.
    drop_in_data_after: int | None = None
    offer_xclient: bool = True
    # Refuse RCPT for addresses starting with this local part.
    refuse_local: str | None = None
    # Offer STARTTLS with this context (upstream TLS tests).
    tls_context: ssl.SSLContext | None = None
    # user -> password accepted by AUTH PLAIN/LOGIN (AUTH passthrough tests).
    accounts: dict[str, str] = field(default_factory=dict)
    # Offer AUTH in the EHLO reply.
    offer_auth: bool = True
    # Like Postfix with smtpd_authorized_xclient_hosts = the proxy only: once XCLIENT
    # named another client, XCLIENT is no longer offered and is refused (550 5.7.0).
    xclient_chain: bool = True
    # Command name -> reply given once, the next time that command comes (then gone).
    once: dict[str, str] = field(default_factory=dict)
    # False: count and hash the content, keep none of it (memory measurements).
    keep_content: bool = True


def _authenticator(server, session, envelope, mechanism, auth_data) -> AuthResult:
    accounts = server.sink.behaviour.accounts
    if isinstance(auth_data, LoginPassword):
        # Undecodable credentials are wrong ones (535), as for Postfix.
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        if accounts.get(user) == password:
            return AuthResult(success=True, auth_data=auth_data)
    return AuthResult(success=False, handled=False)


class SinkSMTP(SMTP):
    def __init__(self, sink: Sink) -> None:
        super().__init__(
            sink,
            hostname="sink.test",
            enable_SMTPUTF8=True,
            data_size_limit=None,
            tls_context=sink.behaviour.tls_context,
            authenticator=_authenticator,
            auth_require_tls=False,
        )
        self.sink = sink
        self.xclient: list[str] = []
        self.rcpt_params: list[list[str]] = []

    async def _answer(self, name: str, default: str) -> None:
        b = self.sink.behaviour
        if name in b.delays:
            await asyncio.sleep(b.delays[name])
        await self.push(b.replies.get(name, default))

    async def smtp_EHLO(self, hostname: str) -> None:
        self.sink.commands.append(f"EHLO {hostname}")
        if "EHLO" in self.sink.behaviour.replies:
            await self.push(self.sink.behaviour.replies["EHLO"])
            return
        self.session.host_name = hostname
        self.session.extended_smtp = True
        lines = [
            "250-sink.test",
            "250-PIPELINING",
            "250-SIZE 100000000",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-ENHANCEDSTATUSCODES",
            "250-DSN",
            "250-CHUNKING",
            "250-ETRN",
            "250-VRFY",
            "250-XFORWARD NAME ADDR",
        ]
        if self.sink.behaviour.offer_auth:
            lines.append("250-AUTH PLAIN LOGIN")
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("250-STARTTLS")
        if self.sink.behaviour.offer_xclient:
            lines.append("250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN")
        if self.xclient and not self.sink.behaviour.xclient_chain:
            lines = [line for line in lines if "XCLIENT" not in line]
        lines.append("250 HELP")
        for line in lines:
            await self.push(line)

    def _login(self) -> str | None:
        auth = self.session.auth_data
        if self.session.authenticated and isinstance(auth, LoginPassword):
            return auth.login.decode()
        for line in reversed(self.xclient):
            for attr in line.split():
                if attr.startswith("LOGIN="):
                    return attr[len("LOGIN=") :]
        return None

    async def smtp_STARTTLS(self, arg: str) -> None:
        self.sink.commands.append("STARTTLS")
        if "STARTTLS" in self.sink.behaviour.replies:
            await self.push(self.sink.behaviour.replies["STARTTLS"])
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_AUTH(self, arg: str) -> None:
        # Only the mechanism is recorded: the rest is a credential.
        self.sink.commands.append(f"AUTH {arg.split()[0] if arg else ''}".rstrip())
        await super().smtp_AUTH(arg)

    async def smtp_HELO(self, hostname: str) -> None:
        self.sink.commands.append(f"HELO {hostname}")
        self.session.host_name = hostname
        await self.push("250 sink.test")

    async def smtp_XCLIENT(self, arg: str) -> None:
        self.sink.commands.append(f"XCLIENT {arg}")
        b = self.sink.behaviour
        reply = b.once.pop("XCLIENT", None) or b.replies.get("XCLIENT", "220 sink.test ESMTP")
        if self.xclient and not b.xclient_chain:
            reply = "550 5.7.0 Error: insufficient authorization"
        if reply.startswith("2"):  # Postfix says 220, smtp-sink 250
            self.xclient.append(arg)
            self.session.host_name = None
            self._set_rset_state()
        await self.push(reply)

    async def smtp_MAIL(self, arg: str) -> None:
        self.sink.commands.append(f"MAIL {arg}")
        if "MAIL" in self.sink.behaviour.replies:
            await self._answer("MAIL", "")
            return
        addr, _, params = arg[5:].partition(">")
        self.envelope.mail_from = addr.lstrip("<")
        self.envelope.mail_options = params.split()
        self.rcpt_params = []
        await self._answer("MAIL", "250 2.1.0 Ok")

    async def smtp_RCPT(self, arg: str) -> None:
        self.sink.commands.append(f"RCPT {arg}")
        addr, _, params = arg[3:].partition(">")
        addr = addr.lstrip("<")
        b = self.sink.behaviour
        if b.refuse_local and addr.startswith(b.refuse_local + "@"):
            await self.push(f"550 5.1.1 <{addr}>: Recipient address rejected: User unknown")
            return
        if "RCPT" in b.replies:
            await self._answer("RCPT", "")
            return
        self.envelope.rcpt_tos.append(addr)
        self.rcpt_params.append(params.split())
        await self._answer("RCPT", "250 2.1.5 Ok")

    async def smtp_RSET(self, arg: str) -> None:
        self.sink.commands.append("RSET")
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.sink.commands.append("QUIT")
        await super().smtp_QUIT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.sink.commands.append("DATA")
        b = self.sink.behaviour
        if "DATA" in b.replies:
            await self._answer("DATA", "")
            return
        if not self.envelope.rcpt_tos:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        data = bytearray()
        size, digest = 0, hashlib.sha256()
        while True:
            line = await self._reader.readuntil(b"\r\n")
            if line == b".\r\n":
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line)
            digest.update(line)
            if b.keep_content:
                data += line
            if b.drop_in_data_after is not None and size >= b.drop_in_data_after:
                self.transport.close()
                return
        reply = b.replies.get("DOT", "250 2.0.0 Ok: queued as SINK")
        if "DOT" in b.delays:
            await asyncio.sleep(b.delays["DOT"])
        if reply.startswith("250"):
            self.sink.messages.append(
                Received(
                    mail_from=self.envelope.mail_from or "",
                    mail_params=list(self.envelope.mail_options),
                    rcpt_tos=list(self.envelope.rcpt_tos),
                    rcpt_params=list(self.rcpt_params),
                    content=bytes(data),
                    xclient=list(self.xclient),
                    helo=self.session.host_name,
                    tls=self._tls_protocol is not None,
                    login=self._login(),
                    size=size,
                    digest=digest.hexdigest(),
                )
            )
        self._set_post_data_state()
        await self.push(reply)


class Sink:
    """The recording upstream. `messages` are the ones it said 250 for."""

    def __init__(self) -> None:
        self.behaviour = SinkBehaviour()
        self.messages: list[Received] = []
        self.commands: list[str] = []
        self.connections = 0
        self.sessions: list[SinkSMTP] = []  # one per connection, in order
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    def _factory(self) -> SinkSMTP:
        self.connections += 1
        session = SinkSMTP(self)
        self.sessions.append(session)
        return session

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
