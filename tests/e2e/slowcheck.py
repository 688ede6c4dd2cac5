"""A check that takes its time on demand, for the tests of deadlines and of a
spamgate that dies while Postfix waits for it.

`[slow] seconds` is how long it sleeps, `timeout` its own timeout (the runner's:
past it, `on_error` applies), at RCPT for a recipient whose local part is `slow`
and at the end of data for a Subject containing "slow". Everything else it lets
pass at once.

`python -m tests.e2e.slowcheck run -c FILE` runs spamgate with it (`CHECKS`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from typing import Literal

from spamgate.app import DEFAULT_CHECKS
from spamgate.config.settings import setting
from spamgate.model import Stage
from spamgate.pipeline.check import Check, CheckContext
from spamgate.pipeline.verdict import DUNNO, Verdict


@dataclass(frozen=True)
class SlowSettings:
    seconds: float = setting(0.0, "How long the check sleeps when asked to.")
    timeout: float = setting(10.0, "The check's own timeout.")
    on_error: Literal["continue", "tempfail"] = setting("continue", "Past the timeout.")


class SlowCheck(Check):
    name = "slow"
    stages = frozenset({Stage.RCPT, Stage.EOD})
    section = ("slow", SlowSettings)

    def __init__(self, settings: SlowSettings) -> None:
        self.seconds = settings.seconds
        self.timeout = settings.timeout
        self.on_error = settings.on_error

    @classmethod
    def from_config(cls, config, services) -> list[Check]:
        settings: SlowSettings = config.section("slow")
        return [cls(settings)] if settings.seconds > 0 else []

    async def check(self, ctx: CheckContext) -> Verdict:
        if ctx.stage is Stage.RCPT and ctx.recipient is not None:
            if ctx.recipient.address.startswith("slow@"):
                await asyncio.sleep(self.seconds)
            return DUNNO
        msg = ctx.message
        if msg is not None and any("slow" in h.value for h in msg.get_all("Subject")):
            logging.getLogger("spamgate.test").info("slow check: %g s at end of data", self.seconds)
            await asyncio.sleep(self.seconds)
        return DUNNO


CHECKS = (*DEFAULT_CHECKS, SlowCheck)


if __name__ == "__main__":
    from spamgate.cli import main

    sys.exit(main(sys.argv[1:], checks=CHECKS))
