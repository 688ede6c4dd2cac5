"""Lookup tables in Postfix's text syntax: `cidr:`, `regexp:` and `hash:`.

A table is named `type:path` in the configuration, read once when a policy is built
and never changed afterwards; a reload builds new tables. `load_table` parses the
whole file and reports every bad line as `file:line: message` at once. A lookup
takes a `Query` (what is being looked up, and how: a client, a domain, a mail
address, a line of text) and yields the matching entries in the table's order, so
the caller can skip monitor-only (`WARN REJECT`) entries and go on to the next.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from ..model import IPAddress
from ..settings import ConfigError, display_path
from ..verdict import CheckError
from .actions import RuleAction
from .source import LogicalLine, UnreadableTable, read_lines

if TYPE_CHECKING:
    from ..config import Config

QueryKind = Literal["client", "domain", "address", "text"]
TABLE_TYPES = ("cidr", "regexp", "hash")
MYHOSTNAME = "${myhostname}"


class RuleTimeout(CheckError):
    """A lookup took longer than its bound (a regexp that backtracks, a huge input)."""

    kind = "timeout"


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


def load_table(
    spec: str,
    *,
    base_dir: str = ".",
    hostname: str = "localhost",
    limits: TableLimits | None = None,
) -> Table:
    """Read and validate a table; ConfigError listing every bad line."""
    from .cidr import CidrTable
    from .hash import HashTable
    from .regexp import RegexpTable

    kind, configured = split_spec(spec)
    path = configured if os.path.isabs(configured) else os.path.join(base_dir, configured)
    shown = display_path(path)
    lines = read_lines(path, shown)
    cls: type[Table] = {"cidr": CidrTable, "regexp": RegexpTable, "hash": HashTable}[kind]
    return cls.parse(  # type: ignore[attr-defined]
        table_name(configured), shown, lines, hostname=hostname, limits=limits or TableLimits()
    )


def load_configured(
    spec: str, config: Config, section: str, key: str, item: str | None = None
) -> Table:
    """Load a table the configuration names at `[section] key` (`item`: the entry of
    a key that is itself a table); a file that cannot be read at all is reported at
    that line of the configuration, after `[section] key:`, with the file's path."""
    try:
        return load_table(
            spec,
            base_dir=config.base_dir,
            hostname=config.hostname,
            limits=config.section("rules").limits,
        )
    except UnreadableTable as exc:
        if config.path is None:
            raise
        where = config.where()
        raise ConfigError(
            [where.at(section, key, f"[{section}] {key}: {p}", item=item) for p in exc.problems]
        ) from None


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


__all__ = [
    "Match",
    "Query",
    "RuleTimeout",
    "Table",
    "TableLimits",
    "load_configured",
    "load_table",
    "split_spec",
]
