"""What every table type shares: the query, the match, the table base class, and
the parsing helpers; `cidr`, `hash` and `regexp` build on it, `__init__` loads."""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

from ..config.settings import ConfigError
from ..model import IPAddress
from .actions import RuleAction
from .source import LogicalLine

QueryKind = Literal["client", "domain", "address", "text"]
TABLE_TYPES = ("cidr", "regexp", "hash")
MYHOSTNAME = "${myhostname}"


class TableTimeout(Exception):
    """A lookup took longer than its bound (a regexp that backtracks, a huge input)."""


@dataclass(frozen=True, slots=True)
class Query:
    """What is looked up. `text` is the HELO name, the address or the line of text."""

    kind: QueryKind
    text: str = ""
    name: str | None = None  # client: verified host name, if any
    ip: IPAddress | None = None  # client: the address


@dataclass(frozen=True, slots=True)
class Match:
    table: str
    line: int
    action: RuleAction  # with $n references substituted
    key: str  # the key or text that matched

    @property
    def rule(self) -> str:
        return f"{self.table}:{self.line}"


@dataclass(frozen=True)
class TableLimits:
    regexp_timeout: float = 0.1
    match_length: int = 4096


@dataclass(frozen=True, slots=True)
class Entry:
    line: int
    action: RuleAction


class Table(abc.ABC):
    """One loaded table. `name` is the file name: the label in replies, logs, metrics."""

    kind: ClassVar[str]

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.path}"

    @abc.abstractmethod
    def matches(self, query: Query, deadline: float | None = None) -> Iterator[Match]:
        """Matching entries in the order this table type defines."""

    def lines(self) -> list[int]:
        """The line of every entry: the rule ids of `spamgate_rule_hits_total`."""
        entries = self.entries  # type: ignore[attr-defined]  # every table type sets it
        return sorted(e.line for e in (entries.values() if isinstance(entries, dict) else entries))

    def first(self, query: Query, deadline: float | None = None) -> Match | None:
        return next(iter(self.matches(query, deadline)), None)

    def _match(self, entry: Entry, key: str) -> Match:
        return Match(self.name, entry.line, entry.action, key)


def split_spec(spec: str) -> tuple[str, str]:
    """`type:path` → (type, path); ValueError with a readable reason."""
    kind, sep, path = spec.partition(":")
    if not sep or not path:
        raise ValueError(f'"{spec}" is not "type:path" (for example "regexp:rules/helo.regexp")')
    if kind not in TABLE_TYPES:
        raise ValueError(
            f'"{spec}": unknown table type "{kind}" (use '
            + ", ".join(f"{t}:" for t in TABLE_TYPES)
            + ")"
        )
    return kind, path


def table_name(path: str) -> str:
    return os.path.basename(path)


def parse_entries(
    where: str, lines: list[LogicalLine], parse_one
) -> list:  # parse_one(line) -> item; raises ValueError
    """Run `parse_one` over every line, collecting `where:line: message` problems."""
    problems: list[str] = []
    items = []
    for line in lines:
        try:
            items.append(parse_one(line))
        except ValueError as exc:
            problems.append(f"{where}:{line.number}: {exc}")
    if problems:
        raise ConfigError(problems)
    return items


def split_rule(text: str) -> tuple[str, str]:
    """`pattern action...` → (pattern, action text)."""
    parts = text.split(None, 1)
    if len(parts) < 2:
        raise ValueError(f"'{text.strip()}' has no action (expected 'pattern action [text]')")
    return parts[0], parts[1]
