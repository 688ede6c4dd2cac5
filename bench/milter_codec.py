"""What the milter codec costs per message: decoding Postfix's packets, encoding replies.

    python -m bench.milter_codec                  # 10 KB and 1 MB messages, a few seconds
    python -m bench.milter_codec --sizes 2,10000 --repeat 5

One "message" is what Postfix sends a filter for one SMTP session with one message
(spamgate's negotiated macro lists, 12 header fields, the body in 65,535-byte chunks,
end of message, two aborts, quit) and what spamgate answers (a continue per event, an
X-Spam-Score field and a continue at the end). The stream is fed in 64 KB reads, as
the server reads the socket. The figure is CPU time per message in this process,
the best of `--repeat` runs (the least disturbed by other load).

If `kilter.protocol` is importable (it is not a dependency: `pip install
kilter-protocol`), the same stream is decoded with its FilterProtocol and
SimpleBuffer, and its responses packed, for comparison; kilter has no SMFIC_QUIT_NC,
which this stream does not use.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spamgate.milter.codec import AddHeader, Continue, Decoder  # noqa: E402
from spamgate.milter.connection import MilterConnection, Send, Step  # noqa: E402
from spamgate.milter.negotiate import Needs  # noqa: E402
from tests.kit.milterkit import connect, cstrings, macros, mta_packet, optneg  # noqa: E402

READ = 65536
MAX_MESSAGES = 100_000


def session_stream(body_size: int) -> bytes:
    """The MTA's bytes for one SMTP session carrying one message of `body_size` bytes."""
    parts = [
        optneg(),
        macros(
            b"C",
            j="mx.example.test",
            daemon_name="mx.example.test",
            client_addr="192.0.2.7",
            client_port="40000",
            client_name="mail.example.org",
            client_ptr="mail.example.org",
        ),
        connect("mail.example.org", "192.0.2.7", 40000),
        macros(b"H"),
        mta_packet(b"H", cstrings("mail.example.org")),
        macros(b"M"),
        mta_packet(b"M", cstrings("<alice@example.org>", "SIZE=12345", "BODY=8BITMIME")),
        mta_packet(b"R", cstrings("<bob@example.test>")),
        macros(b"T", i="4QXkLm0Yz8z9sTq"),
        mta_packet(b"T"),
    ]
    for n in range(12):
        parts.append(mta_packet(b"L", cstrings(f"X-Header-{n}", f" value number {n} " + "v" * 40)))
    parts.append(mta_packet(b"N"))
    line = b"z" * 76 + b"\r\n"
    body = (line * (body_size // len(line) + 1))[:body_size]
    for i in range(0, len(body), 65535):
        parts.append(mta_packet(b"B", body[i : i + 65535]))
    parts += [
        macros(b"E", i="4QXkLm0Yz8z9sTq"),
        mta_packet(b"E"),
        mta_packet(b"A"),
        mta_packet(b"A"),
        mta_packet(b"Q"),
    ]
    return b"".join(parts)


def spamgate_once(stream: bytes) -> int:
    """Decode the session and encode every answer; the bytes written back."""
    conn = MilterConnection(Needs())
    written = 0
    edit = (AddHeader("X-Spam-Score", "1.5"),)
    for i in range(0, len(stream), READ):
        for out in conn.receive(stream[i : i + READ]):
            if isinstance(out, Send):
                written += len(out.data)
            elif isinstance(out, Step) and out.replies:
                end = type(out.event).__name__ == "EndOfMessage"
                written += len(conn.answer(out, Continue(), edit if end else ()))
    return written


def decode_only(stream: bytes) -> int:
    decoder = Decoder()
    return sum(len(decoder.feed(stream[i : i + READ])) for i in range(0, len(stream), READ))


def kilter_once(stream: bytes) -> int:
    from kilter.protocol import messages as m
    from kilter.protocol.buffer import SimpleBuffer
    from kilter.protocol.core import FilterProtocol

    proto = FilterProtocol()
    inbuf, outbuf = SimpleBuffer(1 << 20), SimpleBuffer(1 << 20)
    written = 0
    for i in range(0, len(stream), READ):
        inbuf[:] = stream[i : i + READ]
        for msg in proto.read_from(inbuf):
            if isinstance(msg, m.Negotiate):
                reply = m.Negotiate(6, m.ActionFlags(0x31), m.ProtocolFlags(0x100100))
                proto.write_to(outbuf, reply)
            elif proto.needs_response(msg):
                if isinstance(msg, m.EndOfMessage):
                    proto.write_to(outbuf, m.AddHeader("X-Spam-Score", b" 1.5"))
                proto.write_to(outbuf, m.Continue())
            written += outbuf.filled
            del outbuf[:]
    return written


def per_message(fn, stream: bytes, budget: float = 1.0) -> float:
    """CPU seconds per call, measured over about `budget` seconds."""
    fn(stream)  # warm up
    count, start = 0, time.process_time()
    while time.process_time() - start < budget and count < MAX_MESSAGES:
        fn(stream)
        count += 1
    return (time.process_time() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000", help="body sizes in KB, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    try:
        import kilter.protocol  # noqa: F401

        have_kilter = True
    except ImportError:
        have_kilter = False
    print(f"load average {os.getloadavg()[0]:.2f}; best of {args.repeat}; CPU µs per message")
    header = f"{'body':>8} {'packets':>8} {'decode':>9} {'decode+answer':>14}"
    print(header + (f" {'kilter':>9}" if have_kilter else ""))
    for kb in (int(x) for x in args.sizes.split(",")):
        stream = session_stream(kb * 1000)
        packets = decode_only(stream)
        dec = min(per_message(decode_only, stream) for _ in range(args.repeat))
        full = min(per_message(spamgate_once, stream) for _ in range(args.repeat))
        row = f"{kb:>6}KB {packets:>8} {dec * 1e6:>9.1f} {full * 1e6:>14.1f}"
        if have_kilter:
            kil = min(per_message(kilter_once, stream) for _ in range(args.repeat))
            row += f" {kil * 1e6:>9.1f}"
        print(row)


if __name__ == "__main__":
    main()
