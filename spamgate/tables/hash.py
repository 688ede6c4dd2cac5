"""`hash:` tables: exact keys, looked up in Postfix's access(5) search order.

The text file is read directly (there is no `postmap` step and no .db file). Keys
are case-insensitive. A client is looked up by verified host name (and its parent
domains), then by address and its shorter prefixes; a mail address as `user@domain`,
`domain`, `.parent` domains, `user@`; see `keys`. A key may be given twice only by
mistake, so a duplicate is an error rather than Postfix's warning.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..config.settings import ConfigError
from .actions import parse_action
from .base import MYHOSTNAME, Entry, Match, Query, Table, TableLimits, split_rule
from .keys import domain_keys, email_keys, ip_keys
from .source import LogicalLine


class HashTable(Table):
    kind = "hash"

    def __init__(self, name: str, path: str, entries: dict[str, Entry]) -> None:
        super().__init__(name, path)
        self.entries = entries

    @classmethod
    def parse(
        cls,
        name: str,
        path: str,
        lines: list[LogicalLine],
        *,
        hostname: str,
        limits: TableLimits,
    ) -> HashTable:
        entries: dict[str, Entry] = {}
        problems = []
        for line in lines:
            try:
                key, entry = _parse_line(line, hostname)
            except ValueError as exc:
                problems.append(f"{path}:{line.number}: {exc}")
                continue
            first = entries.setdefault(key, entry)
            if first is not entry:
                problems.append(
                    f"{path}:{entry.line}: duplicate key '{key}' (first given on line {first.line})"
                )
        if problems:
            raise ConfigError(problems)
        return cls(name, path, entries)

    def keys_for(self, query: Query) -> list[str]:
        """The keys tried for a query, in order (shown by `spamgate query`)."""
        if query.kind == "client":
            keys = []
            if query.name:
                keys += domain_keys(query.name)
            if query.ip is not None:
                keys += ip_keys(query.ip)
            return keys
        if query.kind == "domain":
            return domain_keys(query.text)
        if query.kind == "address":
            return email_keys(query.text)
        return [query.text.lower()]

    def matches(self, query: Query, deadline: float | None = None) -> Iterator[Match]:
        for key in self.keys_for(query):
            entry = self.entries.get(key)
            if entry is not None:
                yield self._match(entry, key)


def _parse_line(line: LogicalLine, hostname: str) -> tuple[str, Entry]:
    key, action_text = split_rule(line.text)
    key = key.replace(MYHOSTNAME, hostname).lower()
    if "/" in key:
        raise ValueError(f"'{key}' looks like a network: put networks in a cidr: table")
    return key, Entry(line.number, parse_action(action_text))
