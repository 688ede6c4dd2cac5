"""Admin rule tables at the envelope stages: client, HELO, sender, recipient.

Each table named in `[rules]` becomes one check, labelled with the table's file
name, so logs, counters and `spamgate explain` show which table said what. Tables of
one stage run in the order listed, like consecutive Postfix `check_*_access`
restrictions: DUNNO, WARN, PREPEND and SCORE go on to the next table, the first
final action (OK, REJECT, DEFER, 4NN/5NN, 421/521, DISCARD, HOLD) ends the stage.
Within a table the first match wins, except that a monitor-only rule
(`WARN REJECT ...`) is logged and counted and the lookup goes on past it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Literal

from ..config.settings import ConfigError, positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext, Series
from ..pipeline.verdict import DUNNO, Verdict
from ..tables import Match, Query, Table, TableLimits, load_configured, split_spec
from ..tables.keys import NULL_SENDER
from .engines.ruleverdict import ReplyContext, lookups, to_verdict

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

STAGE_KEYS = ("client", "helo", "sender", "recipient", "header", "body")
RULE_HITS = "spamgate_rule_hits_total"  # the runner counts each matched entry there
# Rule ids of tables up to this long are created at zero when the table loads, so
# a rule's first hit shows as an increase; longer tables (big blocklists) only get
# series for the rules that match, to keep the series count bounded.
PRECREATED_RULES_PER_TABLE = 1000


def _specs(*, content: bool = False):
    def check(value: list[str]) -> str | None:
        for spec in value:
            try:
                kind, _ = split_spec(spec)
            except ValueError as exc:
                return str(exc)
            if content and kind != "regexp":
                return f'"{spec}": header and body tables must be regexp: tables'
        return None

    return check


def _tables(doc: str, *, content: bool = False) -> list[str]:
    return setting([], doc, check=_specs(content=content))


@dataclass(frozen=True)
class RulesSettings:
    client: list[str] = _tables(
        'Tables for the client at connect, as "type:path" (cidr:, hash:, regexp:; paths are '
        "relative to this file)."
    )
    helo: list[str] = _tables("Tables for the HELO/EHLO name.")
    sender: list[str] = _tables("Tables for the MAIL FROM address (null sender: <>).")
    recipient: list[str] = _tables("Tables for each RCPT TO address.")
    header: list[str] = _tables(
        "regexp: tables for each header line (unfolded; MIME part headers too), at end of data.",
        content=True,
    )
    body: list[str] = _tables(
        "regexp: tables for each line of the decoded text parts, at end of data.", content=True
    )
    timeout: float = setting(
        5.0, "Seconds one table's lookups may take for one stage (then on_error).", check=positive
    )
    on_error: Literal["continue", "tempfail"] = setting(
        "continue", 'A table lookup that fails or times out: "continue" or "tempfail" (451).'
    )
    regexp_timeout: float = setting(
        0.1,
        "Seconds one regexp match may take (stops catastrophic backtracking).",
        check=positive,
    )
    match_length: int = setting(
        4096, "Characters of a key or line that regexps see; the rest is cut.", check=positive
    )
    body_part_size: int = setting(
        51200,
        "Decoded bytes of each text part that body rules read (Postfix body_checks_size_limit).",
        check=positive,
    )
    scan_size: int = setting(
        1048576,
        "Bytes of a message parsed for header and body rules; the rest is not read.",
        check=positive,
    )
    parts: int = setting(100, "MIME parts looked at by header and body rules.", check=positive)

    def __post_init__(self) -> None:
        # Table names label replies, logs and counters: two files may not share one.
        seen: dict[str, str] = {}
        for key in STAGE_KEYS:
            for spec in getattr(self, key):
                try:
                    _, path = split_spec(spec)
                except ValueError:
                    continue  # reported by the field check
                name = os.path.basename(path)
                other = seen.setdefault(name, os.path.normpath(path))
                if other != os.path.normpath(path):
                    raise ValueError(
                        f"tables {other} and {path} share the name '{name}'; rename one"
                    )

    @property
    def limits(self) -> TableLimits:
        return TableLimits(self.regexp_timeout, self.match_length)


def load_tables(config: Config, key: str) -> list[Table]:
    """Load the tables of one `[rules]` list; ConfigError for every problem in them."""
    settings: RulesSettings = config.section("rules")
    tables: list[Table] = []
    problems: list[str] = []
    for spec in getattr(settings, key):
        try:
            tables.append(load_configured(spec, config, "rules", key, limits=settings.limits))
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return tables


def table_files(config: Config, key: str) -> list[str]:
    settings: RulesSettings = config.section("rules")
    out = []
    for spec in getattr(settings, key):
        try:
            _, path = split_spec(spec)
        except ValueError:
            continue
        out.append(config.resolve_path(path))
    return out


def decide(matches: Iterable[Match], reply: ReplyContext) -> Verdict:
    """The verdict of one table lookup: the first match, past monitor-only rules."""
    would: list[Verdict] = []
    hits: list[tuple[str, int]] = []
    for m in matches:
        hits.append((m.table, m.line))
        verdict = to_verdict(m.action, m.rule, reply)
        if m.action.monitor:
            would.append(verdict)
            continue
        return replace(verdict, would=tuple(would), hits=tuple(hits))
    if not hits:
        return DUNNO
    return Verdict(would=tuple(would), hits=tuple(hits))


def rule_series(table: Table) -> Iterable[Series]:
    """The rule-hit series of a table, created at zero when it loads (see
    `Check.metric_series`); not for tables too long to graph rule by rule."""
    lines = table.lines()
    if len(lines) <= PRECREATED_RULES_PER_TABLE:
        for line in lines:
            yield RULE_HITS, (table.name, str(line))


class TableCheck(Check):
    """One envelope table at one stage; subclasses say what is looked up."""

    section = ("rules", RulesSettings)

    key: ClassVar[str]  # the [rules] list this check reads

    def __init__(self, table: Table, settings: RulesSettings) -> None:
        self.table = table
        self.timeout = settings.timeout
        self.on_error = settings.on_error

    @property
    def label(self) -> str:
        return self.table.name

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        settings: RulesSettings = config.section("rules")
        return [cls(t, settings) for t in load_tables(config, cls.key)]

    @classmethod
    def sources(cls, config: Config) -> list[str]:
        return table_files(config, cls.key)

    def metric_series(self) -> Iterable[Series]:
        return rule_series(self.table)

    async def check(self, ctx: CheckContext) -> Verdict:
        asked = self.query(ctx)
        if asked is None:
            return DUNNO
        query, reply = asked
        with lookups():
            return decide(self.table.matches(query, time.monotonic() + self.timeout), reply)

    def query(self, ctx: CheckContext) -> tuple[Query, ReplyContext] | None:
        raise NotImplementedError


class ClientRules(TableCheck):
    name = "client_rules"
    stages = frozenset({Stage.CONNECT})
    key = "client"

    def query(self, ctx: CheckContext) -> tuple[Query, ReplyContext] | None:
        client = ctx.session.client
        name = None if client.name.startswith("[") else client.name
        return (
            Query("client", name=name, ip=client.address),
            ReplyContext(client.display, "Client host"),
        )


class HeloRules(TableCheck):
    name = "helo_rules"
    stages = frozenset({Stage.HELO})
    key = "helo"

    def query(self, ctx: CheckContext) -> tuple[Query, ReplyContext] | None:
        helo = ctx.session.client.helo
        if helo is None:
            return None
        return Query("domain", helo), ReplyContext(helo, "Helo command")


class SenderRules(TableCheck):
    name = "sender_rules"
    stages = frozenset({Stage.MAIL})
    key = "sender"

    def query(self, ctx: CheckContext) -> tuple[Query, ReplyContext] | None:
        if ctx.transaction is None:
            return None
        sender = ctx.transaction.mail_from or NULL_SENDER
        return Query("address", sender), ReplyContext(ctx.transaction.mail_from, "Sender address")


class RecipientRules(TableCheck):
    name = "recipient_rules"
    stages = frozenset({Stage.RCPT})
    key = "recipient"

    def query(self, ctx: CheckContext) -> tuple[Query, ReplyContext] | None:
        if ctx.recipient is None:
            return None
        rcpt = ctx.recipient.address
        return Query("address", rcpt), ReplyContext(rcpt, "Recipient address")
