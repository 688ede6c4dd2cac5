"""Which capture format replays faster: JSON lines or SQLite (docs/capture.md, "Why JSON lines").

    python -m bench.capture_format                  # 50,000 records, about a minute
    python -m bench.capture_format --records 5000   # a smoke run

The same records (shaped as `spamgate.capture` writes them: a refused and an
accepted transaction with its header section, in turn, each with its own client
address, sender, time and DNS answers) are written and read back four ways:

* `jsonl`: one JSON object per line, as written while capturing;
* `jsonl.gz`: the same file once it is complete and compressed (gzip level 6);
* `sqlite-json`: one row per record (time, session, outcome and the record as
  JSON text), as sqlite3 users would query it;
* `sqlite-tables`: the record taken apart into tables (records, recipients,
  verdicts, DNS answers) and put together again for each record, as a replay
  would have to read a normalised database.

Per format: the bytes on disk, records per second written (from the records as
Python values to a file) and read back into the same Python values (what a
replay starts from), each the best of `--repeat` runs on one core.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HEADERS = (
    "Received: from mx.example.net (mx.example.net [192.0.2.7])\r\n\tby gate.example.test\r\n"
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net; s=sel;\r\n"
    " h=from:to:subject:date; bh=zS7KNTV0HyeorkDDGwxB1AV6enuRKzO5rthkhdHIRnY=;\r\n"
    " b=sstzPZW7sbxw9NmlMlnI3hYkA+IIeZrZa8TwtE5QmXnOlF9MOMyMtbWfW1+6EQkX/rpXoiHB8fPC\r\n"
    "From: Someone <someone@example.net>\r\nTo: <u@example.test>\r\nSubject: hello\r\n"
    "Date: Fri, 6 Dec 2024 14:02:03 +0000\r\nMessage-ID: <1@example.net>\r\n\r\n"
)


def records(n: int) -> list[dict[str, Any]]:
    """`n` records: every other one refused at RCPT by a DNS list, the others accepted."""
    out = []
    for i in range(n):
        ip = f"192.0.{(i >> 8) & 255}.{i & 255}"
        rev = ".".join(reversed(ip.split(".")))
        refused = i % 2 == 0
        rec: dict[str, Any] = {
            "v": 1,
            "t": 1733493723.512 + i,
            "sid": f"{i:010X}",
            "n": 1,
            "cfg": "d7fc918188e08fba",
            "client": {
                "address": ip,
                "port": 40000 + i % 20000,
                "name": f"mx{i}.example.net",
                "helo": [[f"mx{i}.example.net", True, None]],
            },
            "mail": {
                "from": f"sender{i}@example{i % 97}.net",
                "params": [],
                "keywords": {"SIZE": "2048"},
                "reply": [250, "2.1.0", ["Ok"]],
                "by": "upstream",
            },
            "rcpt": [
                {
                    "to": "u@example.test",
                    "params": [],
                    "reply": [554, "5.7.1", [f"client [{ip}] blocked using zen.bl.test"]]
                    if refused
                    else [250, "2.1.5", ["Ok"]],
                    "by": "us" if refused else "upstream",
                }
            ],
            "end": {
                "outcome": "rejected" if refused else "accepted",
                "score": 0.0,
                "reply": None if refused else [250, "2.0.0", ["Ok: queued"]],
                "by": None if refused else "upstream",
            },
            "verdicts": [
                {"stage": "connect", "entry": "client.cidr", "action": "dunno"},
                {
                    "stage": "connect",
                    "entry": "dnsbl",
                    "action": "reject" if refused else "dunno",
                    "counted": [
                        ["spamgate_dnsbl_results_total", ["zen.bl.test", "listed"]],
                    ],
                },
                {"stage": "helo", "entry": "spf", "action": "dunno"},
                {"stage": "mail", "entry": "spf", "action": "dunno"},
            ],
            "dns": [
                [f"{rev}.zen.bl.test", "A", "answer" if refused else "nxdomain", 300, None],
                [f"example{i % 97}.net", "TXT", "answer", 3600, [["v=spf1 ip4:192.0.0.0/16 -all"]]],
            ],
            "state": [],
            "auth": {"spf": "pass", "spf_helo": "none"},
        }
        if not refused:
            rec["data"] = {"reply": None, "by": None}
            rec["message"] = {"size": 2048, "sha256": "cd2e" * 16, "headers": HEADERS}
        out.append(rec)
    return out


# -- JSON lines ------------------------------------------------------------------------------


def write_jsonl(path: Path, recs: list[dict[str, Any]], opener: Callable = open) -> None:
    with opener(path, "wb") as fh:
        for rec in recs:
            line = json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n"
            fh.write(line.encode())


def read_jsonl(path: Path, opener: Callable = open) -> Iterator[dict[str, Any]]:
    loads = json.loads
    with opener(path, "rb") as fh:
        for line in fh:
            yield loads(line)


def gzip_level6(path: Path, mode: str):
    return gzip.open(path, mode, compresslevel=6)


# -- SQLite, one row per record ---------------------------------------------------------------


def write_sqlite_json(path: Path, recs: list[dict[str, Any]]) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE records (t REAL, sid TEXT, n INTEGER, outcome TEXT, record TEXT)")
    with db:
        db.executemany(
            "INSERT INTO records VALUES (?, ?, ?, ?, ?)",
            (
                (
                    r["t"],
                    r["sid"],
                    r["n"],
                    r["end"]["outcome"],
                    json.dumps(r, ensure_ascii=False, separators=(",", ":")),
                )
                for r in recs
            ),
        )
    db.close()


def read_sqlite_json(path: Path) -> Iterator[dict[str, Any]]:
    db = sqlite3.connect(path)
    loads = json.loads
    for (text,) in db.execute("SELECT record FROM records ORDER BY rowid"):
        yield loads(text)
    db.close()


# -- SQLite, normalised ----------------------------------------------------------------------


def write_sqlite_tables(path: Path, recs: list[dict[str, Any]]) -> None:
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE records (id INTEGER PRIMARY KEY, t REAL, sid TEXT, n INTEGER, cfg TEXT,
            client TEXT, mail TEXT, data TEXT, message TEXT, end_ TEXT, auth TEXT, state TEXT);
        CREATE TABLE rcpt (record INTEGER, pos INTEGER, address TEXT, params TEXT,
            reply TEXT, by TEXT);
        CREATE TABLE verdicts (record INTEGER, pos INTEGER, stage TEXT, entry TEXT,
            action TEXT, rest TEXT);
        CREATE TABLE dns (record INTEGER, name TEXT, type TEXT, status TEXT, ttl INTEGER,
            data TEXT);
        """
    )
    dumps = json.dumps
    with db:
        for i, r in enumerate(recs):
            db.execute(
                "INSERT INTO records VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    i,
                    r["t"],
                    r["sid"],
                    r["n"],
                    r["cfg"],
                    dumps(r["client"]),
                    dumps(r.get("mail")),
                    dumps(r.get("data")),
                    dumps(r.get("message")),
                    dumps(r["end"]),
                    dumps(r.get("auth")),
                    dumps(r["state"]),
                ),
            )
            db.executemany(
                "INSERT INTO rcpt VALUES (?,?,?,?,?,?)",
                [
                    (i, k, x["to"], dumps(x["params"]), dumps(x["reply"]), x["by"])
                    for k, x in enumerate(r.get("rcpt", []))
                ],
            )
            db.executemany(
                "INSERT INTO verdicts VALUES (?,?,?,?,?,?)",
                [
                    (
                        i,
                        k,
                        v["stage"],
                        v["entry"],
                        v["action"],
                        dumps(
                            {a: b for a, b in v.items() if a not in ("stage", "entry", "action")}
                        ),
                    )
                    for k, v in enumerate(r["verdicts"])
                ],
            )
            db.executemany(
                "INSERT INTO dns VALUES (?,?,?,?,?,?)",
                [(i, d[0], d[1], d[2], d[3], dumps(d[4])) for d in r["dns"]],
            )
    db.close()


def read_sqlite_tables(path: Path) -> Iterator[dict[str, Any]]:
    db = sqlite3.connect(path)
    loads = json.loads
    rcpts: dict[int, list] = {}
    for rid, address, params, reply, by in db.execute(
        "SELECT record, address, params, reply, by FROM rcpt ORDER BY record, pos"
    ):
        rcpts.setdefault(rid, []).append(
            {"to": address, "params": loads(params), "reply": loads(reply), "by": by}
        )
    verdicts: dict[int, list] = {}
    for rid, stage, entry, action, rest in db.execute(
        "SELECT record, stage, entry, action, rest FROM verdicts ORDER BY record, pos"
    ):
        verdicts.setdefault(rid, []).append(
            {"stage": stage, "entry": entry, "action": action, **loads(rest)}
        )
    answers: dict[int, list] = {}
    for rid, name, rdtype, status, ttl, data in db.execute(
        "SELECT record, name, type, status, ttl, data FROM dns ORDER BY rowid"
    ):
        answers.setdefault(rid, []).append([name, rdtype, status, ttl, loads(data)])
    for row in db.execute("SELECT * FROM records ORDER BY id"):
        rid, t, sid, n, cfg, client, mail, data, message, end, auth, state = row
        rec: dict[str, Any] = {"v": 1, "t": t, "sid": sid, "n": n, "cfg": cfg}
        rec["client"] = loads(client)
        for key, text in (("mail", mail), ("data", data), ("message", message)):
            value = loads(text)
            if value is not None:
                rec[key] = value
        rec["rcpt"] = rcpts.get(rid, [])
        rec["end"] = loads(end)
        rec["verdicts"] = verdicts.get(rid, [])
        rec["dns"] = answers.get(rid, [])
        rec["state"] = loads(state)
        rec["auth"] = loads(auth)
        yield rec
    db.close()


def best(repeat: int, job: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()
        job()
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    recs = records(a.records)
    sample = copy.deepcopy(recs[:2])
    with tempfile.TemporaryDirectory(prefix="sg-format-") as tmp:
        d = Path(tmp)
        formats: list[tuple[str, Path, Callable[[], object], Callable[[], Iterator]]] = [
            (
                "jsonl",
                d / "c.jsonl",
                lambda: write_jsonl(d / "c.jsonl", recs),
                lambda: read_jsonl(d / "c.jsonl"),
            ),
            (
                "jsonl.gz",
                d / "c.jsonl.gz",
                lambda: write_jsonl(d / "c.jsonl.gz", recs, gzip_level6),
                lambda: read_jsonl(d / "c.jsonl.gz", gzip.open),
            ),
            ("sqlite-json", d / "c.db", None, lambda: read_sqlite_json(d / "c.db")),
            ("sqlite-tables", d / "t.db", None, lambda: read_sqlite_tables(d / "t.db")),
        ]
        writers = {
            "sqlite-json": lambda: (_rm(d / "c.db"), write_sqlite_json(d / "c.db", recs)),
            "sqlite-tables": lambda: (_rm(d / "t.db"), write_sqlite_tables(d / "t.db", recs)),
        }
        print(
            f"capture formats: {a.records} records (half refused at RCPT, half accepted "
            f"with a {len(HEADERS)}-byte header section); best of {a.repeat}, CPU time, one core; "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print(f"{'format':<15}{'bytes/record':>13}{'write rec/s':>13}{'read rec/s':>13}")
        for name, path, write, read in formats:
            write = write or writers[name]
            w = best(a.repeat, write)
            got = list(read())
            assert got[:2] == sample, name  # the same values come back
            r = best(a.repeat, lambda read=read: sum(1 for _ in read()))
            size = path.stat().st_size
            print(
                f"{name:<15}{size / a.records:>13.0f}{a.records / w:>13,.0f}{a.records / r:>13,.0f}"
            )
        print(f"load average at the end {os.getloadavg()[0]:.2f}")


def _rm(path: Path) -> None:
    if path.exists():
        path.unlink()


if __name__ == "__main__":
    main()
