"""The hosts a message links to: found in its text and HTML, normalised for lookup.

What senders do to hide a link from a filter, and what undoes it here:

* HTML: links sit in `href`, `src`, `action` and `background` attributes, with
  entities (`listed&#46;example`) and odd case; a real HTML parser (selectolax,
  on the Lexbor engine: maintained, C, WHATWG-conformant, linear on deep nesting
  of most elements) reads them as a browser would, and its text is searched too.
* Text: `http://`, `www.`, bare `example.com/path`, `mailto:` and plain mail
  addresses. A bare name counts when its top-level domain is a known public
  suffix, or when a path follows it (`example.test/x`).
* Hosts: percent-escapes, user-info and ports removed, trailing dots dropped,
  lower-cased, Unicode names to A-labels by UTS #46 (`idna`), so full-width dots
  and mixed scripts end up as the name a resolver would ask for; integer and
  dotted-quad hosts are IP addresses.
* Redirectors: a URL inside another URL's query string or path
  (`https://redirect.example/?u=https%3A%2F%2Flisted.example`) is found as well.

A host is looked up by its registered domain (the public suffix plus one label,
from the Public Suffix List, the `publicsuffixlist` package), as DBL-style lists
expect. The work is bounded by the caller: `max_links` link strings at most.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

import idna
from publicsuffixlist import PublicSuffixList
from selectolax.lexbor import LexborHTMLParser

from ...model import IPAddress
from ...resolver import is_domain

Source = Literal["href", "src", "text", "mailto", "redirect"]
# Order of looking up: links a reader clicks first.
SOURCE_ORDER: dict[str, int] = {"href": 0, "redirect": 1, "mailto": 2, "src": 3, "text": 4}

_PSL = PublicSuffixList()
_PSL_KNOWN = PublicSuffixList(accept_unknown=False)

_URL = re.compile(
    r"(?:\b(?:https?|ftp)s?:[/\\]{2}|\bwww\d{0,3}\.)[^\s<>\"'`]+", re.IGNORECASE | re.ASCII
)
# Unicode letters count: an IDN written in its own script is a link too.
_LABEL = r"[^\W_](?:[\w-]{0,61}[^\W_])?"
_BARE = re.compile(
    rf"(?<![\w@.%/-])((?:{_LABEL}[.\u3002\uff0e\uff61])+{_LABEL})(/[^\s<>\"'`]*)?", re.IGNORECASE
)
# Both start only where a word starts: a long run of letters costs one try, not one
# per letter (which made 40 KB of "xxxx" take seconds).
_MAIL = re.compile(rf"(?<![\w.+=-])[\w.+=-]{{1,64}}@((?:{_LABEL}\.)+{_LABEL})", re.IGNORECASE)
_MAILTO = re.compile(r"^mailto:", re.IGNORECASE)
_NESTED = re.compile(r"(?:https?|ftp)s?(?::|%3a)(?:/|\\|%2f|%5c){2}|www\d{0,3}\.", re.IGNORECASE)
_DOT = re.compile("[.\u3002\uff0e\uff61]")
_SPLIT_AUTHORITY = re.compile(r"[/?#\\]")
_ATTRIBUTES = ("href", "src", "action", "background")


@dataclass(frozen=True, slots=True)
class Link:
    """One host found, where it was found, and the key to look up."""

    host: str  # normalised: A-label domain, or an IP address as text
    source: Source
    domain: str | None  # the registered domain; None for an IP address
    ip: IPAddress | None = None


@dataclass
class Found:
    links: list[Link] = field(default_factory=list)
    seen: set[tuple[str, str]] = field(default_factory=set)
    examined: int = 0  # link strings looked at
    truncated: bool = False  # max_links reached

    def add(self, link: Link) -> None:
        key = (link.host, link.source)
        if key not in self.seen:
            self.seen.add(key)
            self.links.append(link)


def normal_host(raw: str) -> tuple[str, IPAddress | None] | None:
    """(host, ip) for a URL's host part, or None if it is no host one could visit."""
    host = urllib.parse.unquote(raw).strip().lower()
    host = host.replace("\u3002", ".").replace("\uff0e", ".").replace("\uff61", ".")
    host = host.rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        try:
            ip6 = ipaddress.IPv6Address(host[1:-1].split("%", 1)[0])
        except ValueError:
            return None
        return str(ip6), ip6
    if host.isdigit():  # http://3221225985/: one 32-bit number, as browsers read it
        value = int(host)
        if value < 2**32:
            ip4 = ipaddress.IPv4Address(value)
            return str(ip4), ip4
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return str(ip), ip
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    return (host, None) if is_domain(host) else None


def url_host(url: str) -> str | None:
    """The host part of a URL as written (scheme, user-info and port removed)."""
    rest = url
    scheme_end = rest.find(":")
    if scheme_end > 0 and rest[:scheme_end].isalpha():
        rest = rest[scheme_end + 1 :]
        rest = rest.lstrip("/\\")
    authority = _SPLIT_AUTHORITY.split(rest, 1)[0]
    authority = authority.rpartition("@")[2]
    if authority.startswith("["):
        return authority.split("]", 1)[0] + "]"
    return authority.split(":", 1)[0]


class Extractor:
    """Collects the links of one message, within `max_links` link strings."""

    def __init__(self, max_links: int) -> None:
        self.max_links = max_links
        self.found = Found()

    @property
    def full(self) -> bool:
        return self.found.examined >= self.max_links

    def _count(self) -> bool:
        if self.full:
            self.found.truncated = True
            return False
        self.found.examined += 1
        return True

    def add_host(self, raw: str, source: Source) -> None:
        if not self._count():
            return
        normal = normal_host(raw)
        if normal is None:
            return
        host, ip = normal
        domain = None if ip is not None else _PSL.privatesuffix(host)
        if ip is None and domain is None:
            return  # a public suffix itself ("co.uk"): nothing registered to look up
        self.found.add(Link(host, source, domain, ip))

    def add_url(self, url: str, source: Source, depth: int = 0) -> None:
        if _MAILTO.match(url):
            address = urllib.parse.unquote(url[7:]).split("?", 1)[0]
            for one in address.split(","):
                _, at, domain = one.strip().rpartition("@")
                if at:
                    self.add_host(domain, "mailto")
            return
        host = url_host(url)
        if host:
            self.add_host(host, source)
        if depth < 2:
            self.nested(url, depth)

    def nested(self, url: str, depth: int) -> None:
        """URLs carried inside this one (redirectors): in its path, query or fragment."""
        start = url.find("/", url.find("//") + 2) if "//" in url else url.find("/")
        if start < 0:
            return
        rest = url[start:]
        if not _NESTED.search(rest):
            return
        inner = urllib.parse.unquote(urllib.parse.unquote(rest))
        for m in _URL.finditer(inner):
            if self.full:
                return
            self.add_url(m.group(0), "redirect", depth + 1)

    def text(self, text: str) -> None:
        # Only words with a dot or a colon in them can be links or addresses:
        # only they meet the costlier patterns (half of the CPU otherwise).
        words = " ".join(w for w in text.split() if _DOT.search(w) or ":" in w)
        if not words:
            return
        for m in _URL.finditer(words):
            if self.full:
                return
            url = m.group(0).rstrip(".,;:!?)]}'\"")
            if url[:3].lower() == "www":
                url = "http://" + url
            self.add_url(url, "text")
        if "@" in words:
            for m in _MAIL.finditer(words):
                if self.full:
                    return
                self.add_host(m.group(1), "mailto")
        for m in _BARE.finditer(words):
            if self.full:
                return
            name, path = m.group(1), m.group(2)
            if path is None and not _known_suffix(name):
                continue  # "invoice.pdf", "readme.txt": not a link without a path
            self.add_host(name, "text")

    def html(self, markup: str) -> None:
        tree = LexborHTMLParser(markup)
        nodes = tree.css("[href], [src], [action], [background]")
        for node in nodes:
            if self.full:
                self.found.truncated = True
                return
            attrs = node.attributes
            for name in _ATTRIBUTES:
                value = attrs.get(name)
                if not value:
                    continue
                value = value.strip()
                source: Source = "href" if name in ("href", "action") else "src"
                if value[:4].lower() == "www.":
                    value = "http://" + value
                elif value.startswith(("//", "\\\\")):  # scheme-relative
                    value = "http:" + value
                if _MAILTO.match(value) or "//" in value[:12] or "\\\\" in value[:12]:
                    self.add_url(value, source)
        root = tree.body or tree.root
        if root is not None:
            self.text(root.text(separator=" "))


def _known_suffix(name: str) -> bool:
    try:
        return _PSL_KNOWN.publicsuffix(name.lower()) is not None
    except (ValueError, UnicodeError):
        return False


def ordered(links: list[Link]) -> list[Link]:
    """Links in lookup order: by where they were found, then as they came."""
    return sorted(links, key=lambda link: SOURCE_ORDER[link.source])
