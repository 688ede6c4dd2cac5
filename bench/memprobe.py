"""Run `spamgate` with a memory probe: SIGUSR1 appends what the heap holds to a file.

For finding what grows in a soak (bench/chaos.py --probe): each SIGUSR1 writes
the RSS, the live objects counted by type, and, when started with
`-X tracemalloc=N`, the allocation sites that grew since the previous probe.

    python -X tracemalloc=5 -m bench.memprobe /tmp/probe.txt run -c spamgate.toml
"""

from __future__ import annotations

import collections
import gc
import os
import signal
import sys
import time
import tracemalloc

from spamgate.cli import main as spamgate_main

_previous: tracemalloc.Snapshot | None = None


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def probe(path: str) -> None:
    global _previous
    gc.collect()
    counts = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
    traced = ""
    if tracemalloc.is_tracing():
        traced = f", Python heap {tracemalloc.get_traced_memory()[0] / 2**20:.1f} MB"
    lines = [f"== probe at {time.strftime('%H:%M:%S')}: RSS {_rss_mb():.1f} MB{traced}"]
    lines += [f"  {n:8d} {name}" for name, n in counts.most_common(25)]
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot()
        if _previous is not None:
            lines.append("  grown since the previous probe (by line):")
            for stat in snapshot.compare_to(_previous, "lineno")[:15]:
                lines.append(f"    {stat}")
        _previous = snapshot
    with open(path, "a") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    path = sys.argv[1]
    signal.signal(signal.SIGUSR1, lambda *_: probe(path))
    raise SystemExit(spamgate_main(sys.argv[2:]))


if __name__ == "__main__":
    main()
