"""Postfix's search orders for indexed (hash:) access tables.

access(5): a mail address is looked up as `user@domain`, then `domain`, then each
parent domain as `.parent` (spamgate behaves as Postfix does when
`parent_domain_matches_subdomains` does not list smtpd_access_maps), then `user@`.
An IPv4 address is looked up whole, then with its last octet dropped, and so on
(`192.0.2.1`, `192.0.2`, `192.0`, `192`); an IPv6 address is cut at its last `:`
in compressed form, the same way. Keys are lower-case.
"""

from __future__ import annotations

import ipaddress

from ..model import IPAddress

NULL_SENDER = "<>"  # Postfix's smtpd_null_access_lookup_key


def domain_keys(domain: str) -> list[str]:
    d = domain.lower().rstrip(".")
    if not d:
        return []
    if d.startswith("[") or _is_ip(d):
        return [d]  # an address literal has no parent domains
    keys = [d]
    labels = d.split(".")
    keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))]
    return keys


def email_keys(address: str) -> list[str]:
    a = address.lower()
    if a in ("", NULL_SENDER):
        return [NULL_SENDER]
    user, at, domain = a.rpartition("@")
    if not at:
        return [a, f"{a}@"]
    return [a, *domain_keys(domain), f"{user}@"]


def ip_keys(address: IPAddress) -> list[str]:
    text = str(address)  # lower-case, compressed for IPv6
    sep = "." if address.version == 4 else ":"
    keys = [text]
    while sep in text:
        text = text.rpartition(sep)[0]
        if text:
            keys.append(text)
    return keys


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_ip(text: str) -> IPAddress | None:
    """An address from a key: `192.0.2.1`, `[192.0.2.1]`, `[IPv6:2001:db8::1]`."""
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    if t[:5].lower() == "ipv6:":
        t = t[5:]
    try:
        return ipaddress.ip_address(t)
    except ValueError:
        return None
