"""A pre-fork parent for the multiprocess metrics test: N workers, one summed scrape.

    python -m tests.e2e.mpharness CONFIG DIRECTORY N

It does what the pre-fork server will do with `spamgate.metrics`: the parent calls
`enable_multiprocess()` before forking, each worker runs an ordinary `Server`
(its own SMTP port here, for the test to tell them apart), the parent serves
`scrape_registry()` and calls `worker_exited()` when a worker ends. It prints
`worker PID PORT` per worker, then `metrics PORT`, then `exited PID` as workers
end; SIGTERM stops the workers and the parent.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from spamgate import metrics
from spamgate.app import build, load
from spamgate.ops.exporter import Exporter
from spamgate.ops.server import Server


async def worker(config_path: str, report: int) -> int:
    server = Server(build(load(config_path)))
    await server.start()
    os.write(report, f"{server.addresses[0][1]}\n".encode())
    os.close(report)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(grace=0.5)
    return 0


def main() -> int:
    config_path, directory, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    metrics.enable_multiprocess(directory)
    pids: list[int] = []
    for _ in range(count):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            os._exit(asyncio.run(worker(config_path, w)))
        os.close(w)
        with os.fdopen(r) as fh:
            port = fh.readline().strip()
        pids.append(pid)
        print(f"worker {pid} {port}", flush=True)

    def stop(signum, frame) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    exporter = Exporter(
        "127.0.0.1",
        0,
        metrics.scrape_registry(),
        health=lambda: (True, "parent"),
        ready=lambda: (True, "parent"),
    )
    exporter.start()
    print(f"metrics {exporter.address[1]}", flush=True)
    while pids:
        pid, _ = os.wait()
        pids.remove(pid)
        metrics.worker_exited(pid)
        print(f"exited {pid}", flush=True)
    exporter.stop()
    metrics.remove_multiprocess_files()
    return 0


if __name__ == "__main__":
    sys.exit(main())
