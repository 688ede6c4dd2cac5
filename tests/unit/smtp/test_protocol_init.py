"""SMTPSession sets up aiosmtpd's state without aiosmtpd's per-connection introspection.

The fast path must leave the protocol object exactly as aiosmtpd's own __init__
would, except for the lookup tables this class never uses: compared here attribute
by attribute, so an aiosmtpd upgrade that adds state fails this test, not a session.
"""

from __future__ import annotations

import asyncio
import ssl

from aiosmtpd.smtp import SMTP as AiosmtpdSMTP

from spamgate.app import build, loads
from spamgate.ops.server import Server
from spamgate.smtp.protocol import SMTPSession, _NoHooks

from ...conftest import TlsFiles, config_text

# Filled by aiosmtpd's introspection; deliberately empty here (see _fast_aiosmtpd_init).
UNUSED_TABLES = {"_auth_methods", "_smtp_methods"}


def reference(session: SMTPSession, tls: ssl.SSLContext | None) -> SMTPSession:
    """What aiosmtpd's own __init__ makes of the same arguments."""
    ref = object.__new__(SMTPSession)
    AiosmtpdSMTP.__init__(
        ref,
        _NoHooks(),
        hostname=session.hostname,
        data_size_limit=session.data_size_limit,
        enable_SMTPUTF8=session.enable_SMTPUTF8,
        tls_context=tls,
        timeout=session._timeout_duration,
        loop=asyncio.get_running_loop(),
    )
    return ref


def comparable(value: object) -> object:
    # Per-instance objects (the reader, bound methods, futures) by type; values as such.
    if isinstance(value, int | float | str | bool | type(None) | dict | ssl.SSLContext):
        return value
    return type(value)


async def check_same_state(text: str, tls: bool) -> None:
    server = Server(build(loads(text)))
    session = SMTPSession(server.app)
    ref = reference(session, server.runtime.policy.tls)
    expected, ours = vars(ref), vars(session)
    aiosmtpd_keys = set(expected)
    assert aiosmtpd_keys <= set(ours), aiosmtpd_keys - set(ours)
    for key in sorted(aiosmtpd_keys - UNUSED_TABLES):
        if key == "_proxy_timeout":
            continue  # ours: the listener's PROXY setting, set after aiosmtpd's state
        assert comparable(ours[key]) == comparable(expected[key]), key
    assert (session.tls_context is not None) is tls
    assert session._stream_reader._limit == ref._stream_reader._limit == 65536
    assert expected["_auth_methods"]  # aiosmtpd found its builtin AUTH methods...
    assert session._auth_methods == {} and session._smtp_methods == {}  # ...we skip it
    await server.services.aclose()


async def test_same_state_as_aiosmtpd() -> None:
    await check_same_state(config_text(None), tls=False)


async def test_same_state_as_aiosmtpd_with_starttls(tls_files: TlsFiles) -> None:
    await check_same_state(config_text(None, tls_files.toml), tls=True)
