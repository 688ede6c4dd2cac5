"""`spamgate report`: what a capture says about the rules, without replaying it.

* the rules and DNS lists that hit most (a transaction counts once per rule);
* `WARN` rules (and everything, in monitor mode) with the refusals they would
  have made: how many transactions, from how many clients, and how many of those
  carried mail that passed DKIM and DMARC (if none did, the rule may be ready to
  enforce);
* refused mail that passed DKIM and DMARC with an aligned DKIM signature: the
  first place to look for false positives;
* outcomes per day.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .diff import client_text, sender_domain
from .output import printable
from .records import read
from .run import REFUSED

LISTED = "spamgate_dnsbl_results_total"
REFUSING = frozenset({"reject", "defer", "disconnect", "discard", "hold"})


def authenticated(record: dict[str, Any]) -> bool:
    """Mail that passed DKIM and DMARC, the DKIM signature aligned with From."""
    auth = record.get("auth") or {}
    dkim = auth.get("dkim") or []
    return (
        any(isinstance(s, list) and s[:1] == ["pass"] for s in dkim)
        and auth.get("dmarc") == "pass"
        and auth.get("dmarc_dkim_aligned") is True
    )


@dataclass
class Would:
    transactions: int = 0
    clients: set[str] = field(default_factory=set)
    authenticated: int = 0


@dataclass
class Report:
    transactions: int = 0
    files: list[str] = field(default_factory=list)
    rules: collections.Counter[str] = field(default_factory=collections.Counter)
    lists: collections.Counter[str] = field(default_factory=collections.Counter)
    would: dict[str, Would] = field(default_factory=dict)
    refused_authenticated: list[dict[str, Any]] = field(default_factory=list)
    days: dict[str, collections.Counter[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, path: str, line: int, record: dict[str, Any]) -> None:
        self.transactions += 1
        if path not in self.files:
            self.files.append(path)
        day = time.strftime("%Y-%m-%d", time.gmtime(record["t"]))
        outcome = record["end"]["outcome"]
        self.days.setdefault(day, collections.Counter())[outcome] += 1
        rules: set[str] = set()
        zones: set[str] = set()
        would: set[str] = set()
        monitor = record.get("mode") == "monitor"
        for v in record["verdicts"]:
            if v.get("rule") and v["action"] != "dunno":
                rules.add(v["rule"])
                if (v.get("monitor") or monitor) and v["action"] in REFUSING:
                    would.add(v["rule"])
            for table, number in v.get("hits", ()):
                rules.add(f"{table}:{number}")
            for w in v.get("would", ()):
                if w.get("rule"):
                    would.add(w["rule"])
            for series, labels in v.get("counted", ()):
                if series == LISTED and len(labels) == 2 and labels[1] == "listed":
                    zones.add(labels[0])
        self.rules.update(rules)
        self.lists.update(zones)
        good = authenticated(record)
        for rule in would:
            w = self.would.setdefault(rule, Would())
            w.transactions += 1
            w.clients.add(record["client"]["address"])
            w.authenticated += good
        if outcome in REFUSED and good:
            decided = [
                v.get("rule") or v["entry"]
                for v in record["verdicts"]
                if v["action"] in ("reject", "defer", "disconnect") and not v.get("monitor")
            ]
            self.refused_authenticated.append(
                {
                    "time": record["t"],
                    "file": path,
                    "line": line,
                    "client": client_text(record),
                    "from": (record.get("mail") or {}).get("from"),
                    "domain": sender_domain(record),
                    "rule": decided[-1] if decided else None,
                    "reply": (record["end"].get("reply") or [None])[0],
                }
            )

    def as_dict(self, top: int) -> dict[str, Any]:
        return {
            "transactions": self.transactions,
            "files": self.files,
            "top_rules": [{"rule": r, "transactions": n} for r, n in self.rules.most_common(top)],
            "top_lists": [{"zone": z, "transactions": n} for z, n in self.lists.most_common(top)],
            "would_refuse": [
                {
                    "rule": rule,
                    "transactions": w.transactions,
                    "clients": len(w.clients),
                    "passed_dkim_and_dmarc": w.authenticated,
                }
                for rule, w in sorted(self.would.items(), key=lambda x: -x[1].transactions)
            ],
            "refused_but_authenticated": self.refused_authenticated,
            "days": {day: dict(c) for day, c in sorted(self.days.items())},
            "skipped": self.errors,
        }


def build_report(paths: Sequence[str], *, skip_bad: bool = False) -> tuple[Report, str | None]:
    report = Report()
    for item in read(paths):
        if item.error is not None:
            if not skip_bad:
                return report, item.error
            report.errors.append(item.error)
            continue
        assert item.record is not None
        report.add(item.path, item.line, item.record)
    return report, None


def text(report: Report, out: TextIO, top: int) -> None:
    d = report.as_dict(top)
    w = out.write
    w(f"spamgate report: {d['transactions']} transactions from {len(d['files'])} file(s)\n")
    w(f"\ntop rules by transactions hit (of {d['transactions']}):\n")
    for r in d["top_rules"] or [{"rule": "(none)", "transactions": 0}]:
        w(f"  {printable(r['rule']):<48}{r['transactions']:>9}\n")
    w("\ntop DNS lists by transactions listed:\n")
    for z in d["top_lists"] or [{"zone": "(none)", "transactions": 0}]:
        w(f"  {printable(z['zone']):<48}{z['transactions']:>9}\n")
    w("\nWARN (monitor-only) rules and the refusals they would have made:\n")
    if not d["would_refuse"]:
        w("  (none)\n")
    for x in d["would_refuse"]:
        verdict = (
            "no mail that passed DKIM and DMARC among them"
            if not x["passed_dkim_and_dmarc"]
            else f"{x['passed_dkim_and_dmarc']} passed DKIM and DMARC: look before enforcing"
        )
        w(
            f"  {printable(x['rule']):<40} would refuse {x['transactions']} from "
            f"{x['clients']} client(s); {verdict}\n"
        )
    w("\nrefused mail that passed DKIM and DMARC (aligned): look here for false positives\n")
    if not d["refused_but_authenticated"]:
        w("  (none)\n")
    for x in d["refused_but_authenticated"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(x["time"]))
        w(
            f"  {when}  {printable(x['client'])}  <{printable(x['from'] or '')}>  "
            f"{x['reply']} (rule {printable(str(x['rule']))})  {x['file']}:{x['line']}\n"
        )
    w("\noutcomes per day (UTC):\n")
    kinds = sorted({k for c in d["days"].values() for k in c})
    w(f"  {'day':<12}" + "".join(f"{k:>14}" for k in kinds) + "\n")
    for day, counts in d["days"].items():
        w(f"  {day:<12}" + "".join(f"{counts.get(k, 0):>14}" for k in kinds) + "\n")
    if d["skipped"]:
        w("\nskipped:\n")
        for e in d["skipped"]:
            w(f"  {printable(e)}\n")


def as_json(report: Report, out: TextIO, top: int) -> None:
    json.dump(report.as_dict(top), out, indent=1, ensure_ascii=False)
    out.write("\n")
