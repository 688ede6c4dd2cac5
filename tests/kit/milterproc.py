"""A milter in its own process, for tests that kill it: `python -m tests.kit.milterproc PORT`.

It answers "continue" to everything and prints "ready" once it listens.
"""

from __future__ import annotations

import asyncio
import sys

from spamgate.milter.server import MilterServer

from .milterkit import Recorder


async def main(port: int) -> None:
    server = MilterServer(Recorder())
    await server.listen_tcp("127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
