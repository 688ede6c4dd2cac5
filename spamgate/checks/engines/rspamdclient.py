"""An rspamd client: POST /checkv2 with the envelope as headers, over HTTP (httpx).

rspamd's protocol (rspamd.com/doc/developers/protocol.html) is HTTP: the message
is the request body and what an MTA knows goes in headers (IP, Helo, Hostname,
From, one Rcpt per recipient, User, Queue-Id); the answer is JSON with the
score, the action rspamd chose and the symbols that fired. httpx (maintained,
asyncio-native, explicit timeouts for connect, write and read, Unix sockets)
carries it; the body is streamed from the spooled message block by block with
its Content-Length, and at most 1 MB of answer is read.

One client (a connection pool) per event loop and address, shared by every
check instance, so a configuration reload keeps the connections warm.
"""

from __future__ import annotations

import asyncio
import json
import weakref
from dataclasses import dataclass, field

import httpx

from ...message import Message
from .backend import message_blocks, printable

_ANSWER_MAX = 1048576
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary()
)


class RspamdError(Exception):
    """rspamd could not be reached or gave no usable answer."""


@dataclass(frozen=True)
class RspamdAnswer:
    action: str  # "no action", "greylist", "add header", "rewrite subject", "soft reject", "reject"
    score: float
    required: float
    symbols: dict[str, float] = field(default_factory=dict)
    message: str = ""  # rspamd's smtp_message, if it gave one
    skipped: bool = False


def _client(url: str) -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    by_url = _clients.setdefault(loop, {})
    client = by_url.get(url)
    if client is None:
        transport = None
        base = url
        if url.startswith("unix:"):
            transport = httpx.AsyncHTTPTransport(uds=url[5:])
            base = "http://rspamd"
        client = httpx.AsyncClient(
            base_url=base,
            transport=transport,
            limits=httpx.Limits(max_connections=100, keepalive_expiry=10),
            trust_env=False,
        )
        by_url[url] = client
    return client


async def checkv2(
    url: str,
    message: Message,
    headers: list[tuple[str, str]],
    timeout: float,
    password: str = "",
) -> RspamdAnswer:
    """Scan `message`; `headers` carry the envelope. Raises RspamdError."""
    sent = [(k, printable(v, 500)) for k, v in headers]
    sent.append(("Content-Length", str(message.size)))
    if password:
        sent.append(("Password", password))
    request = _client(url).build_request(
        "POST",
        "/checkv2",
        headers=sent,
        content=message_blocks(message, message.size),
        timeout=httpx.Timeout(timeout),
    )
    try:
        response = await _client(url).send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > _ANSWER_MAX:
                    raise RspamdError("answer larger than 1 MB")
        finally:
            await response.aclose()
    except httpx.TimeoutException:
        raise TimeoutError from None
    except httpx.HTTPError as exc:
        raise RspamdError(f"{type(exc).__name__}: {exc}") from None
    if response.status_code != 200:
        raise RspamdError(
            f"HTTP {response.status_code}: {printable(body.decode('utf-8', 'replace'))}"
        )
    return read_answer(bytes(body))


def read_answer(body: bytes) -> RspamdAnswer:
    try:
        data = json.loads(body)
        symbols = {
            str(name): float(sym.get("score", 0.0))
            for name, sym in (data.get("symbols") or {}).items()
            if isinstance(sym, dict)
        }
        messages = data.get("messages") or {}
        return RspamdAnswer(
            action=str(data.get("action", "no action")),
            score=float(data.get("score", 0.0)),
            required=float(data.get("required_score", 0.0)),
            symbols=symbols,
            message=str(messages.get("smtp_message", "")) if isinstance(messages, dict) else "",
            skipped=bool(data.get("is_skipped", False)),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise RspamdError(f"not an rspamd answer: {exc}") from None
