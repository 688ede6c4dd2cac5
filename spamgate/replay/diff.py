"""What a candidate configuration changes, summed over every replayed transaction.

Each transaction falls in one class: it kept its outcome; it is newly refused (let
through before: accepted, discarded, held, refused by the upstream or given up by
the client; refused by spamgate now); newly accepted (the reverse); changed
otherwise (another code, a recipient refused or accepted beside the others, the
X-Spam tag added or gone, quarantined instead of delivered); or unknown (the
candidate asked what the capture does not hold: its outcome is not evidence).
Every change is put down to the rule that decided it: for a newly refused one
the rule refusing it now, for a newly accepted one the rule that refused it then.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any

from .records import Item
from .run import Outcome, Replayed

CLASSES = ("kept", "refused", "accepted", "changed", "unknown")


def category(before: Outcome, after: Outcome) -> str:
    if before.key == after.key:
        return "kept"
    if after.refused and not before.refused:
        return "refused"
    if before.refused and not after.refused:
        return "accepted"
    return "changed"


def sender_domain(record: dict[str, Any]) -> str:
    mail = record.get("mail")
    if mail is None:
        return "-"
    sender = mail["from"]
    return sender.rpartition("@")[2].lower() if "@" in sender else "<>"


def client_text(record: dict[str, Any]) -> str:
    c = record["client"]
    name = "unknown" if c["name"].startswith("[") else c["name"]
    return f"{name}[{c['address']}]"


def deciding_rule(kind: str, before: Outcome, after: Outcome) -> str:
    """The rule a change is put down to: the one refusing now (newly refused), the
    one refusing then (newly accepted); for another change, the rule of the first
    recipient whose reply changed, else of the end, else the X-Spam tag."""
    if kind == "refused":
        return after.rule or "(no rule)"
    if kind == "accepted":
        return before.rule or "(no rule)"
    for i, (b, a) in enumerate(zip(before.rcpts, after.rcpts, strict=False)):
        if b != a:
            rules = (*after.rcpt_rules[i : i + 1], *before.rcpt_rules[i : i + 1])
            found = next((x for x in rules if x), None)
            if found:
                return found
    if before.tagged != after.tagged and before.key[:3] == after.key[:3]:
        return "score:tag"
    return after.rule or before.rule or "(no rule)"


def outcome_class(o: Outcome) -> str:
    """For the chart: delivered (or let through), rejected, tempfailed."""
    return o.label if o.refused else "accepted"


@dataclass
class RuleChange:
    refused: int = 0  # transactions it newly refuses
    accepted: int = 0  # ... it no longer refuses
    changed: int = 0  # ... whose code it changed
    clients: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)

    def as_dict(self, rule: str) -> dict[str, Any]:
        return {
            "rule": rule,
            "newly_refused": self.refused,
            "newly_accepted": self.accepted,
            "changed": self.changed,
            "clients": len(self.clients),
            "sender_domains": len(self.domains),
        }


@dataclass
class Diff:
    candidate: str
    listed_max: int = 1000
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    rules: dict[str, RuleChange] = field(default_factory=dict)
    listed: list[dict[str, Any]] = field(default_factory=list)
    not_listed: int = 0
    errors: list[str] = field(default_factory=list)
    # hour (Unix time // 3600) -> {"before"/"after": Counter of outcome classes}
    timeline: dict[int, dict[str, collections.Counter[str]]] = field(default_factory=dict)
    unknown_asked: collections.Counter[str] = field(default_factory=collections.Counter)
    files: list[str] = field(default_factory=list)
    live: int = 0
    assumed: int = 0
    recorded_under: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def status(self) -> int:
        """0: every record replayed and none changed; 1: something changed, could not
        be decided, or was skipped."""
        changed = sum(self.counts[c] for c in CLASSES if c != "kept")
        return 1 if changed or self.errors else 0

    def add(self, r: Replayed) -> None:
        record = r.record
        if r.item.path not in self.files:
            self.files.append(r.item.path)
        self.live += r.live
        self.assumed += r.assumed
        self.recorded_under[record.get("cfg") or "?"] += 1
        kind = "unknown" if r.unknown else category(r.before, r.after)
        self.counts[kind] += 1
        hour = int(record["t"] // 3600)
        slot = self.timeline.setdefault(hour, _pair())
        slot["before"][outcome_class(r.before)] += 1
        slot["after"][outcome_class(r.after)] += 1
        if kind == "kept":
            return
        for what in r.unknown:
            self.unknown_asked[what] += 1
        rule = None
        if kind != "unknown":
            rule = deciding_rule(kind, r.before, r.after)
            change = self.rules.setdefault(rule, RuleChange())
            setattr(change, kind, getattr(change, kind) + 1)
            change.clients.add(record["client"]["address"])
            change.domains.add(sender_domain(record))
        if len(self.listed) >= self.listed_max:
            self.not_listed += 1
            return
        self.listed.append(
            {
                "class": kind,
                "file": r.item.path,
                "line": r.item.line,
                "time": record["t"],
                "sid": record["sid"],
                "n": record["n"],
                "client": client_text(record),
                "from": record["mail"]["from"] if record.get("mail") else None,
                "to": [x["to"] for x in record.get("rcpt", [])],
                "rule": rule,
                "before": outcome_dict(r.before),
                "after": outcome_dict(r.after),
                "unknown": list(r.unknown),
            }
        )

    def skip(self, item: Item) -> None:
        assert item.error is not None
        self.errors.append(item.error)

    def rule_rows(self) -> list[dict[str, Any]]:
        rows = [c.as_dict(rule) for rule, c in self.rules.items()]
        rows.sort(
            key=lambda d: (-(d["newly_refused"] + d["newly_accepted"] + d["changed"]), d["rule"])
        )
        return rows

    def buckets(self) -> tuple[str, list[tuple[str, dict[str, collections.Counter[str]]]]]:
        """The timeline by hour, or by day when it spans more than three days."""
        hours = sorted(self.timeline)
        if not hours:
            return "hour", []
        if hours[-1] - hours[0] <= 72:
            return "hour", [
                (time.strftime("%Y-%m-%d %H:00", time.gmtime(h * 3600)), self.timeline[h])
                for h in hours
            ]
        days: dict[str, dict[str, collections.Counter[str]]] = {}
        for h in hours:
            day = time.strftime("%Y-%m-%d", time.gmtime(h * 3600))
            slot = days.setdefault(
                day, {"before": collections.Counter(), "after": collections.Counter()}
            )
            slot["before"].update(self.timeline[h]["before"])
            slot["after"].update(self.timeline[h]["after"])
        return "day", sorted(days.items())

    def as_dict(self) -> dict[str, Any]:
        unit, buckets = self.buckets()
        return {
            "format": 1,
            "candidate": self.candidate,
            "files": self.files,
            "transactions": self.total,
            "summary": {
                "kept": self.counts["kept"],
                "newly_refused": self.counts["refused"],
                "newly_accepted": self.counts["accepted"],
                "changed": self.counts["changed"],
                "unknown": self.counts["unknown"],
                "skipped": len(self.errors),
            },
            "upstream_replies_assumed": self.assumed,
            "asked_live": self.live,
            "unknown_asked": dict(self.unknown_asked.most_common()),
            "rules": self.rule_rows(),
            "transactions_listed": self.listed,
            "transactions_not_listed": self.not_listed,
            "timeline": {
                "unit": unit,
                "buckets": [
                    {"start": label, "before": dict(slot["before"]), "after": dict(slot["after"])}
                    for label, slot in buckets
                ],
            },
            "skipped": self.errors,
            "status": self.status,
        }


def _pair() -> dict[str, collections.Counter[str]]:
    return {"before": collections.Counter(), "after": collections.Counter()}


def outcome_dict(o: Outcome) -> dict[str, Any]:
    return {
        "outcome": o.label,
        "code": o.code,
        "recipients": list(o.rcpts),
        "tagged": o.tagged,
        "score": round(o.score, 3),
        "rule": o.rule,
        "stage": o.stage,
        "reply": o.reply,
        "text": o.describe(),
    }
