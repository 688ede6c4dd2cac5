"""XCLIENT: the real client's facts, as Postfix's XCLIENT_README wants them.

Every value a client chose (its HELO name, its verified name, the SASL login) is
xtext-encoded (RFC 3461, `xtext.py`), so none can smuggle a second attribute, and
the line stays within the 512 octets of an SMTP command, the HELO name giving way
first.
"""

from __future__ import annotations

from .. import xtext
from ..model import Client

# XCLIENT attributes we can fill, in the order sent (ADDR last but LOGIN: Postfix
# re-checks authorization as it applies each one, smtpd.c xclient_cmd).
_XCLIENT_ORDER = ("NAME", "HELO", "PROTO", "PORT", "LOGIN", "ADDR")
_XCLIENT_MAX_LINE = 512


def xclient_args(client: Client, offered: set[str]) -> list[bytes]:
    """The XCLIENT attributes for `client`, limited to those the upstream offers."""
    if client.address.version == 6:
        addr = f"IPV6:{client.address.compressed}"
    else:
        addr = client.address.compressed
    values = {
        "NAME": client.name if client.name.startswith("[") else xtext.encode(client.name),
        "HELO": xtext.encode(client.helo) if client.helo else "[UNAVAILABLE]",
        "PROTO": client.proto,
        "PORT": str(client.port),
        "LOGIN": xtext.encode(client.login) if client.login else None,
        "ADDR": addr,
    }
    args = [
        f"{key}={values[key]}".encode("ascii")
        for key in _XCLIENT_ORDER
        if key in offered and values[key] is not None
    ]
    if len(b"XCLIENT " + b" ".join(args)) + 2 > _XCLIENT_MAX_LINE:
        args = [a for a in args if not a.startswith(b"HELO=")] + [b"HELO=[UNAVAILABLE]"]
    return args
