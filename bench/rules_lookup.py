"""How long rule lookups and header/body scans take, to size INLINE_LIMIT and timeouts.

    python bench/rules_lookup.py

Prints microseconds per envelope lookup (hash: 10,000 keys, cidr: 1,000 networks,
regexp: 200 patterns, all missing, the worst case for first-match tables) and
milliseconds per message for extracting and scanning header and body lines against
100 body patterns, for messages of growing size.
"""

from __future__ import annotations

import base64
import ipaddress
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from spamgate.checks.content import scan
from spamgate.checks.engines.contentview import ContentLimits, extract
from spamgate.message import Message
from spamgate.tables import Query, load_table


def per_call(fn, n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n


def main() -> None:
    tmp = pathlib.Path(tempfile.mkdtemp())
    (tmp / "sender").write_text("".join(f"user{i}@domain{i}.test REJECT\n" for i in range(10000)))
    (tmp / "client.cidr").write_text(
        "".join(f"10.{i // 256}.{i % 256}.0/24 REJECT\n" for i in range(1000))
    )
    (tmp / "helo.regexp").write_text(
        "".join(f"/^host{i}\\.(spam|junk)[0-9]+\\.test$/ REJECT\n" for i in range(200))
    )
    (tmp / "body.regexp").write_text(
        "".join(f"/\\bword{i}\\b.*\\boffer\\b/ SCORE 1 W{i}\n" for i in range(100))
    )
    hash_t = load_table("hash:sender", base_dir=str(tmp))
    cidr_t = load_table("cidr:client.cidr", base_dir=str(tmp))
    re_t = load_table("regexp:helo.regexp", base_dir=str(tmp))
    body_t = load_table("regexp:body.regexp", base_dir=str(tmp))

    q_sender = Query("address", "alice@mail.example.org")
    q_client = Query("client", ip=ipaddress.ip_address("192.0.2.1"))
    q_helo = Query("domain", "mail.example.org")
    print("envelope lookup, no match (worst case):")
    for label, t, q in (
        ("hash 10k keys", hash_t, q_sender),
        ("cidr 1k nets", cidr_t, q_client),
        ("regexp 200", re_t, q_helo),
    ):
        us = per_call(lambda t=t, q=q: list(t.matches(q)), 2000) * 1e6
        print(f"  {label:<16} {us:8.1f} us")

    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod\r\n"
    limits = ContentLimits()
    print("header+body extract and scan, 100 body patterns:")
    for size in (10_000, 64_000, 256_000, 1_000_000, 10_000_000):
        text = line * (size // len(line) // 2)
        attachment = base64.encodebytes(b"\0" * (size // 2)).replace(b"\n", b"\r\n")
        msg = Message(
            b"Subject: bench\r\nMIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
            b"--b\r\nContent-Type: text/plain\r\n\r\n" + text + b"--b\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + attachment
            + b"--b--\r\n"
        )

        def work(msg: Message = msg) -> None:
            view = extract(msg, limits)
            scan(body_t, view.body, time.monotonic() + 60)

        ms = per_call(work, 5) * 1e3
        print(f"  {msg.size / 1e6:6.2f} MB      {ms:8.1f} ms")


if __name__ == "__main__":
    main()
