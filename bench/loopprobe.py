"""Run spamgate with a probe of its event loop's responsiveness.

    python -m bench.loopprobe run -c CONFIG [--log-level warning]

The same as `python -m spamgate run ...`, plus one task on spamgate's event loop
that sleeps TICK seconds over and over and notes how late it wakes up: the
longest such delay is the longest time the loop was held by something else (a
regular expression over a whole message, a hash, a slow callback), i.e. how long
every other session stood still. On SIGUSR1 it prints, on stdout,

    lag max_ms=... p99_ms=... p50_ms=... samples=... dkim_pass=...

for the time since the previous report, and starts over (dkim_pass is the total
of spamgate_auth_results_total{method="dkim",result="pass"} so far).
"""

from __future__ import annotations

import asyncio
import signal
import sys

from spamgate import cli, metrics
from spamgate.ops import server

TICK = 0.002


class Probe:
    def __init__(self) -> None:
        self.lags: list[float] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, self.report)
        while True:
            started = loop.time()
            await asyncio.sleep(TICK)
            self.lags.append(max(0.0, loop.time() - started - TICK))

    def report(self) -> None:
        lags = sorted(self.lags) or [0.0]
        self.lags = []
        n = len(lags)
        passed = metrics.REGISTRY.get_sample_value(
            "spamgate_auth_results_total", {"method": "dkim", "result": "pass"}
        )
        passed = passed or 0.0
        print(
            f"lag max_ms={lags[-1] * 1000:.1f} p99_ms={lags[int(n * 0.99)] * 1000:.1f} "
            f"p50_ms={lags[n // 2] * 1000:.1f} samples={n} dkim_pass={passed:.0f}",
            flush=True,
        )


_start = server.Server.start
_tasks: set[asyncio.Task] = set()


async def _start_with_probe(self: server.Server) -> None:
    await _start(self)
    task = asyncio.ensure_future(Probe().run())
    _tasks.add(task)
    print("probe started", flush=True)


def main() -> int:
    server.Server.start = _start_with_probe  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
