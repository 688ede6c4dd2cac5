"""RFC 3461 xtext, the encoding of XCLIENT and DSN values.

Encoding every character outside "!" to "~" plus "+" and "=" means a value can never
contain a space or an "=", so a client-controlled HELO name such as
`x ADDR=10.0.0.1` cannot smuggle a second XCLIENT attribute.
"""

from __future__ import annotations

import re

_NEEDS = re.compile(r"[^\x21-\x2a\x2c-\x3c\x3e-\x7e]")
_HEX = re.compile(r"\+([0-9A-F]{2})")


def encode(value: str) -> str:
    data = value.encode("utf-8", "surrogateescape")
    out = []
    for byte in data:
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def decode(value: str) -> str:
    return _HEX.sub(lambda m: chr(int(m.group(1), 16)), value)


def is_valid(value: str) -> bool:
    """True if `value` is well-formed xtext (used to check DSN ENVID/ORCPT)."""
    rest = _HEX.sub("", value)
    return "+" not in rest and not _NEEDS.search(rest.replace("+", ""))
