"""`regexp:` tables: `/pattern/flags action`, first match wins, `$1` in the action.

Postfix's regexp_table(5) syntax with Python regular expressions. As in Postfix,
matching is case-insensitive unless the `i` flag toggles it; `m`, `s` and `x` turn
on multi-line, dot-all and verbose mode. `!/pattern/ action` matches when the
pattern does not. `$1`, `${1}` and `$$` in the action text are replaced with the
groups of the match.

Matching every line of a message against every pattern costs lines x patterns
searches, so a table also compiles its plain patterns into one alternation (a
branch-reset group, so each pattern keeps its own group numbers) and asks it first:
a line none of them matches costs one search. Patterns whose meaning could change
inside an alternation (global inline flags, named groups, recursion) are left out
of it and always tried on their own.

Patterns come from admins and inputs from strangers, so a lookup is bounded twice:
the input is cut at `match_length` characters, and each match runs with a time
limit (the `regex` module, which speaks Python's `re` syntax, can stop a match that
backtracks; the standard `re` cannot). A match that runs out of time raises
`TableTimeout`; the check that looked up turns it into its `on_error`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import regex

from .actions import parse_action
from .base import (
    MYHOSTNAME,
    Entry,
    Match,
    Query,
    Table,
    TableLimits,
    TableTimeout,
    parse_entries,
)
from .source import LogicalLine

_FLAGS = {"i": 0, "m": regex.MULTILINE, "s": regex.DOTALL, "x": regex.VERBOSE}
_REF = regex.compile(r"\$(?:(\d)|\{(\d+)\}|\((\d+)\)|(\$))")
_FLAG_LETTERS = (
    (regex.IGNORECASE, "i"),
    (regex.MULTILINE, "m"),
    (regex.DOTALL, "s"),
    (regex.VERBOSE, "x"),
)
# Constructs that make a pattern unsafe to merge into one alternation.
_UNMERGEABLE = regex.compile(r"\(\?[a-zA-Z^]+\)|\(\?P?[<=&]|\\g<|\(\?R|\(\?\(|\(\?\d")


@dataclass(frozen=True, slots=True)
class RegexpEntry(Entry):
    pattern: Any  # a compiled regex.Pattern
    negate: bool
    refs: bool  # the action text has $n references
    mergeable: bool = False  # may join the table's prefilter alternation


class RegexpTable(Table):
    kind = "regexp"

    def __init__(
        self, name: str, path: str, entries: list[RegexpEntry], limits: TableLimits
    ) -> None:
        super().__init__(name, path)
        self.entries = entries
        self.limits = limits
        self._prefilter = _prefilter(entries)
        # Entries the prefilter stands for: skipped when it finds nothing.
        self._merged = {id(e) for e in entries if e.mergeable} if self._prefilter else set()

    @classmethod
    def parse(
        cls,
        name: str,
        path: str,
        lines: list[LogicalLine],
        *,
        hostname: str,
        limits: TableLimits,
    ) -> RegexpTable:
        entries = parse_entries(path, lines, lambda line: _parse_line(line, hostname))
        return cls(name, path, entries, limits)

    def matches(self, query: Query, deadline: float | None = None) -> Iterator[Match]:
        if query.kind == "client":
            texts = [t for t in (query.name, str(query.ip) if query.ip else None) if t]
        else:
            texts = [query.text]
        for text in texts:
            yield from self._search(text[: self.limits.match_length], deadline)

    def _search(self, text: str, deadline: float | None) -> Iterator[Match]:
        maybe = True
        if self._prefilter is not None:
            try:
                maybe = self._prefilter.search(text, timeout=self._budget(deadline)) is not None
            except TimeoutError:
                maybe = True  # try the patterns one by one: the culprit gets named
        for entry in self.entries:
            if not maybe and id(entry) in self._merged:
                continue
            budget = self.limits.regexp_timeout
            if deadline is not None:
                budget = min(budget, deadline - time.monotonic())
                if budget <= 0:
                    raise TableTimeout(f"{self.name}: out of time before line {entry.line}")
            try:
                m = entry.pattern.search(text, timeout=budget)
            except TimeoutError:
                raise TableTimeout(
                    f"{self.name}:{entry.line}: regexp ran longer than {budget:.3g}s "
                    f"on a {len(text)}-character input (catastrophic backtracking?)"
                ) from None
            if (m is None) != entry.negate:
                continue
            action = entry.action
            if entry.refs and m is not None:
                action = replace(
                    action,
                    text=_substitute(action.text, m),
                    source=_substitute(action.source, m),
                )
            yield Match(self.name, entry.line, action, text)

    def _budget(self, deadline: float | None) -> float:
        budget = self.limits.regexp_timeout
        if deadline is not None:
            budget = min(budget, deadline - time.monotonic())
            if budget <= 0:
                raise TableTimeout(f"{self.name}: out of time")
        return budget


def _scoped(entry: RegexpEntry) -> str:
    flags = entry.pattern.flags
    on = "".join(c for f, c in _FLAG_LETTERS if flags & f)
    off = "".join(c for f, c in _FLAG_LETTERS if not flags & f)
    return f"(?{on}-{off}:{entry.pattern.pattern})"


def _prefilter(entries: list[RegexpEntry]) -> Any | None:
    """One alternation of the mergeable patterns, or None if there are too few."""
    merged = [e for e in entries if e.mergeable]
    if len(merged) < 2:
        return None
    try:
        return regex.compile("(?|" + "|".join(_scoped(e) for e in merged) + ")", regex.VERSION0)
    except regex.error:
        return None


def _substitute(text: str, m: Any) -> str:
    def one(ref: Any) -> str:
        if ref.group(4):
            return "$"
        group = int(ref.group(1) or ref.group(2) or ref.group(3))
        return m.group(group) or ""

    return _REF.sub(one, text)


def _parse_line(line: LogicalLine, hostname: str) -> RegexpEntry:
    text = line.text
    if text.split(None, 1)[0].lower() in ("if", "endif"):
        raise ValueError("if/endif blocks are not supported; write one pattern per line")
    negate = text.startswith("!")
    if negate:
        text = text[1:]
    if not text.startswith("/"):
        raise ValueError(f"a pattern starts with '/' (found '{text.split(None, 1)[0]}')")
    end = _closing_slash(text)
    if end < 0:
        raise ValueError("no closing '/' for the pattern")
    source = text[1:end]
    rest = text[end + 1 :]
    flag_text, _, action_text = rest.partition(" ")
    if "\t" in flag_text:
        flag_text, _, more = flag_text.partition("\t")
        action_text = f"{more} {action_text}"
    flags = regex.IGNORECASE
    for ch in flag_text:
        if ch not in _FLAGS:
            raise ValueError(f"unknown flag '{ch}' after the pattern (use i, m, s or x)")
        flags = flags ^ regex.IGNORECASE if ch == "i" else flags | _FLAGS[ch]
    if not action_text.strip():
        raise ValueError(f"/{source}/ has no action (expected '/pattern/flags action [text]')")
    source = source.replace(MYHOSTNAME, regex.escape(hostname))
    try:
        pattern = regex.compile(source, flags | regex.VERSION0)
    except regex.error as exc:
        raise ValueError(f"bad regular expression /{source}/: {exc}") from None
    action = parse_action(action_text)
    refs = bool(_REF.search(action.text))
    if refs:
        if negate:
            raise ValueError("$n references cannot be used with a !/pattern/ (nothing matched)")
        for ref in _REF.finditer(action.text):
            number = ref.group(1) or ref.group(2) or ref.group(3)
            if number is not None and int(number) > pattern.groups:
                raise ValueError(
                    f"${number} refers to a group the pattern does not have "
                    f"(it has {pattern.groups})"
                )
    mergeable = not negate and not pattern.groupindex and not _UNMERGEABLE.search(source)
    return RegexpEntry(line.number, action, pattern, negate, refs, mergeable)


def _closing_slash(text: str) -> int:
    i = 1
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "/":
            return i
        i += 1
    return -1
