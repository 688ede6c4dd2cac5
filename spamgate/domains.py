"""How a domain from the wire compares with one from the configuration.

As DNS compares names: ASCII letters case-insensitively, and a name with
non-ASCII labels by its IDNA 2008 A-labels (RFC 5890), which such a name must
have. Never with Python's Unicode case mapping, which lower-cases the Kelvin sign
"\u212a" to "k" and upper-cases "\u0131" (dotless i) to "I": a domain that only
Python takes for one of ours is another domain to the upstream and to DNS.
"""

from __future__ import annotations

import idna

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """`text` with A-Z lower-cased and every other character as it is."""
    return text.translate(_ASCII_LOWER)


def domain_key(domain: str, *, lenient: bool = False) -> str | None:
    """`domain` as it compares: lower-case ASCII, IDN labels as A-labels, no root
    dot; None if it has no A-label form.

    A client's domain is held to IDNA 2008 as it stands (no mapping: upper-case,
    compatibility and look-alike characters are refused); `lenient` applies the
    UTS 46 mapping first, for what an admin wrote in the configuration.
    """
    domain = ascii_lower(domain).rstrip(".")
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=lenient).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return None
