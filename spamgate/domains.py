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
    """`domain` as it compares and as DNS is asked about it: lower-case ASCII, IDN
    labels as A-labels, no root dot; None if it has no A-label form.

    A client's domain is held to IDNA 2008 as it stands: labels are split at "."
    alone (not at the ideographic and full-width full stops), an ASCII label is
    taken as it is, and every other label must be a U-label (RFC 5891 §5.4: no
    mapping, so upper case, compatibility and look-alike characters are refused).
    `lenient` applies the UTS 46 mapping first, for what an admin wrote in the
    configuration. Every DNS name spamgate derives from client input goes through
    here (`resolver.ascii_domain`, and the resolver itself for any name it is
    given as text), as relay control does: one conversion for the whole product.
    """
    domain = ascii_lower(domain).rstrip(".")
    if domain.isascii():
        return domain
    try:
        if lenient:
            return idna.encode(domain, uts46=True).decode("ascii")
        return ".".join(
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in domain.split(".")
        )
    except (idna.IDNAError, UnicodeError):
        return None
