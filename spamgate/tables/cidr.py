"""`cidr:` tables: `network/prefix action` or `address action`, first match wins.

As in Postfix's cidr_table(5), entries are tried in file order, `!network` matches
addresses outside the network, and a network with host bits set is an error (it
almost always means a typo: `192.0.2.1/24` for `192.0.2.0/24`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

from ..model import IPAddress
from .actions import parse_action
from .base import Entry, Match, Query, Table, TableLimits, parse_entries, split_rule
from .keys import parse_ip
from .source import LogicalLine

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class CidrEntry(Entry):
    network: Network
    negate: bool


class CidrTable(Table):
    """Entries are indexed by prefix length, so a lookup costs one dict probe per
    distinct prefix length in the table rather than one comparison per entry."""

    kind = "cidr"

    def __init__(self, name: str, path: str, entries: list[CidrEntry]) -> None:
        super().__init__(name, path)
        self.entries = entries
        # (version, prefix length) -> {network as int: [entry positions]}
        self._index: dict[tuple[int, int], dict[int, list[int]]] = {}
        self._negated: list[int] = []
        for pos, e in enumerate(entries):
            if e.negate:
                self._negated.append(pos)
                continue
            key = (e.network.version, e.network.prefixlen)
            self._index.setdefault(key, {}).setdefault(int(e.network.network_address), []).append(
                pos
            )

    @classmethod
    def parse(
        cls,
        name: str,
        path: str,
        lines: list[LogicalLine],
        *,
        hostname: str,
        limits: TableLimits,
    ) -> CidrTable:
        return cls(name, path, parse_entries(path, lines, _parse_line))

    def matches(self, query: Query, deadline: float | None = None) -> Iterator[Match]:
        address = self._address(query)
        if address is None:
            return
        value, bits = int(address), address.max_prefixlen
        found: list[int] = []
        for (version, prefix), networks in self._index.items():
            if version == address.version:
                mask = ((1 << prefix) - 1) << (bits - prefix)
                found += networks.get(value & mask, ())
        for pos in self._negated:
            network = self.entries[pos].network
            if network.version != address.version or address not in network:
                found.append(pos)
        for pos in sorted(found):
            yield self._match(self.entries[pos], str(address))

    @staticmethod
    def _address(query: Query) -> IPAddress | None:
        if query.kind == "client":
            return query.ip
        if query.kind == "domain":
            return parse_ip(query.text)
        return None


def _parse_line(line: LogicalLine) -> CidrEntry:
    pattern, action_text = split_rule(line.text)
    negate = pattern.startswith("!")
    if negate:
        pattern = pattern[1:]
    text = pattern[1:-1] if pattern.startswith("[") and pattern.endswith("]") else pattern
    if "/" not in text:
        address = parse_ip(text)
        if address is None:
            raise ValueError(f"'{pattern}' is not an IP address or network")
        network = ipaddress.ip_network(address)
    else:
        try:
            network = ipaddress.ip_network(text, strict=True)
        except ValueError as exc:
            if "host bits set" in str(exc):
                loose = ipaddress.ip_network(text, strict=False)
                raise ValueError(f"'{pattern}' has host bits set (did you mean {loose}?)") from None
            raise ValueError(f"'{pattern}' is not an IP network") from None
    return CidrEntry(line.number, parse_action(action_text), network, negate)
