"""Lookup tables in Postfix's text syntax: `cidr:`, `regexp:` and `hash:`.

A table is named `type:path` in the configuration, read once when a policy is built
and never changed afterwards; a reload builds new tables. `load_table` parses the
whole file and reports every bad line as `file:line: message` at once. A lookup
takes a `Query` (what is being looked up, and how: a client, a domain, a mail
address, a line of text) and yields the matching entries in the table's order, so
the caller can skip monitor-only (`WARN REJECT`) entries and go on to the next.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..config.settings import ConfigError, display_path
from .base import (
    MYHOSTNAME,
    TABLE_TYPES,
    Entry,
    Match,
    Query,
    QueryKind,
    Table,
    TableLimits,
    TableTimeout,
    parse_entries,
    split_rule,
    split_spec,
    table_name,
)
from .cidr import CidrTable
from .hash import HashTable
from .regexp import RegexpTable
from .source import UnreadableTable, read_lines

if TYPE_CHECKING:
    from ..config import Config


def load_table(
    spec: str,
    *,
    base_dir: str = ".",
    hostname: str = "localhost",
    limits: TableLimits | None = None,
) -> Table:
    """Read and validate a table; ConfigError listing every bad line."""
    kind, configured = split_spec(spec)
    path = configured if os.path.isabs(configured) else os.path.join(base_dir, configured)
    shown = display_path(path)
    lines = read_lines(path, shown)
    cls: type[Table] = {"cidr": CidrTable, "regexp": RegexpTable, "hash": HashTable}[kind]
    return cls.parse(  # type: ignore[attr-defined]
        table_name(configured), shown, lines, hostname=hostname, limits=limits or TableLimits()
    )


def load_configured(
    spec: str,
    config: Config,
    section: str,
    key: str,
    item: str | None = None,
    *,
    limits: TableLimits | None = None,
) -> Table:
    """Load a table the configuration names at `[section] key` (`item`: the entry of
    a key that is itself a table); a file that cannot be read at all is reported at
    that line of the configuration, after `[section] key:`, with the file's path."""
    try:
        return load_table(spec, base_dir=config.base_dir, hostname=config.hostname, limits=limits)
    except UnreadableTable as exc:
        if config.path is None:
            raise
        where = config.where()
        raise ConfigError(
            [where.at(section, key, f"[{section}] {key}: {p}", item=item) for p in exc.problems]
        ) from None


__all__ = [
    "MYHOSTNAME",
    "TABLE_TYPES",
    "Entry",
    "Match",
    "Query",
    "QueryKind",
    "Table",
    "TableLimits",
    "TableTimeout",
    "load_configured",
    "load_table",
    "parse_entries",
    "split_rule",
    "split_spec",
    "table_name",
]
