"""AUTH passthrough: the client's SASL exchange relayed to the upstream, which decides.

The upstream owns the password database; spamgate relays each line of the
exchange (never logging one: they carry credentials) and, on success, keeps only
the login name, to introduce the client with XCLIENT LOGIN next time. PLAIN and
LOGIN are the mechanisms whose login name can be read from the exchange.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable

from .. import metrics
from ..reply import Reply
from ..upstream.base import UpstreamError
from .link import UpstreamLink

AUTH_TEMP = Reply(454, "4.7.0", ("Temporary authentication failure",))
AUTH_MECH = Reply(504, "5.5.4", ("Unsupported authentication mechanism",))
AUTH_ABORTED = Reply(501, "5.7.0", ("Authentication aborted",))

# Sends a 334 challenge to the client; its answer line (no CRLF), or None when the
# client went away or sent no proper line.
Respond = Callable[[Reply], Awaitable[bytes | None]]


class SaslRelay:
    def __init__(self, link: UpstreamLink, log: logging.LoggerAdapter) -> None:
        self.link = link
        self.log = log

    async def exchange(
        self, mechanism: str, initial: str | None, respond: Respond
    ) -> tuple[Reply, str | None]:
        """Relay one AUTH exchange; the final reply, and the login name on success."""
        try:
            upstream = await self.link.open()
            if mechanism not in upstream.auth_mechanisms():
                offered = " ".join(sorted(upstream.auth_mechanisms())) or "none"
                self.log.warning(
                    "auth: upstream does not offer %s (it offers: %s); enable SASL on the "
                    "upstream listener (smtpd_sasl_auth_enable, smtpd_tls_auth_only = no)",
                    mechanism,
                    offered,
                )
                metrics.AUTH_PASSTHROUGH.labels("error").inc()
                return (AUTH_MECH if offered != "none" else AUTH_TEMP), None
            command = f"AUTH {mechanism}" + (f" {initial}" if initial is not None else "")
            answers = [initial] if initial is not None else []
            reply = await upstream.auth(command.encode("ascii"))
            while reply.code == 334:
                line = await respond(reply)
                if line is None:
                    # The client is gone or sent garbage: end the upstream exchange too.
                    await self.link.drop()
                    metrics.AUTH_PASSTHROUGH.labels("aborted").inc()
                    return AUTH_ABORTED, None
                answers.append(line.decode("ascii", "replace"))
                reply = await upstream.auth(line)
        except UpstreamError as exc:
            await self.link.drop()
            metrics.AUTH_PASSTHROUGH.labels("error").inc()
            if exc.reply is not None:
                return exc.reply, None
            self.log.warning("auth: upstream failed: %s: %s", exc.kind, exc.detail)
            return AUTH_TEMP, None
        if reply.code == 235:
            login = login_name(mechanism, answers) or ""
            metrics.AUTH_PASSTHROUGH.labels("success").inc()
            self.log.info("auth: %s succeeded, sasl_username=%s", mechanism, login)
            return reply, login
        metrics.AUTH_PASSTHROUGH.labels("aborted" if answers[-1:] == ["*"] else "failure").inc()
        self.log.info("auth: %s failed: %s", mechanism, reply)
        return reply, None


def login_name(mechanism: str, answers: list[str]) -> str | None:
    """The SASL user name from a PLAIN or LOGIN exchange, for XCLIENT LOGIN later.

    PLAIN carries "authzid NUL authcid NUL password" (RFC 4616); LOGIN's first
    answer is the user name. The password is never kept.
    """
    if not answers:
        return None
    try:
        first = base64.b64decode(answers[0], validate=True)
    except (binascii.Error, ValueError):
        return None
    if mechanism == "PLAIN":
        parts = first.split(b"\0")
        if len(parts) != 3:
            return None
        authzid, authcid = parts[0], parts[1]
        return (authzid or authcid).decode("utf-8", "replace")
    return first.decode("utf-8", "replace")
