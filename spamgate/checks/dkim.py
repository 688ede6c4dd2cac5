"""DKIM (RFC 6376): verify every signature of a message, at end of data.

The check decides nothing by itself (RFC 6376 §6.3: a message with a failed
signature is to be treated as if it had none); it records a result per signature
(`DkimResults`) for DMARC and for the Authentication-Results header, and counts
them in spamgate_auth_results_total{method="dkim"}.

DNS stays on the event loop: the key record of each signature
(`selector._domainkey.domain`) is looked up through the shared resolver, all at
once, cached and within the check's time budget. Verification then runs on the
answers alone (`dkimverify`). A small message is verified on the event loop,
where it costs about a millisecond. A larger one goes to a worker process: the
relaxed canonicalisation is pure Python, one regular expression over the whole
body (about 100 ms per MB here), and a thread running it would hold the GIL, and
with it every other session, for that long (bench/dkim.py measures both). A
spooled message is passed to the worker by file name, so this process never
holds it in memory.

A failure of spamgate's own is a check error, not a temperror result: a worker
process that died, or verification that ran out of time once the keys were in.
The runner records it (`CheckFailures`), and DMARC then knows that the missing
result is ours, not the signer's ([dmarc] internal_error).

Clients in mynetworks (and authenticated ones) are ours: their mail is not
verified, as it is not checked for SPF.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.settings import positive, setting
from ..message import Message
from ..model import Stage
from ..pipeline.check import Check, CheckContext, Series
from ..pipeline.verdict import DUNNO, CheckError, Verdict
from ..resolver import DnsError, Resolver
from .engines.dkimverify import (
    KeyAnswer,
    SignatureResult,
    describe,
    signature_key,
    verify,
    verify_message,
)

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

log = logging.getLogger("spamgate.dkim")

AUTH_RESULTS = "spamgate_auth_results_total"  # where results are counted, by method


@dataclass(frozen=True)
class DkimSettings:
    enabled: bool = setting(False, "Verify DKIM signatures (RFC 6376) at end of data.")
    timeout: float = setting(
        20.0,
        "Seconds in all for one message (key lookups and verification); then each "
        "signature not yet verified is temperror.",
        check=positive,
    )
    max_signatures: int = setting(
        5, "Signatures verified per message, from the top; the rest are ignored.", check=positive
    )
    min_key_bits: int = setting(
        1024,
        "Smallest RSA key accepted; a signature with a smaller key is dkim=policy (RFC 8301).",
        check=positive,
    )
    inline_size: int = setting(
        16384,
        "Messages up to this size are verified on the event loop (about 1 ms); larger "
        "ones in worker processes.",
    )
    processes: int = setting(
        2,
        "Worker processes for verifying large messages, shared by all sessions (a "
        "change needs a restart).",
        check=positive,
    )


class VerificationTimeout(CheckError):
    """The signatures were not verified in time although their keys were found."""

    kind = "timeout"


@dataclass(frozen=True)
class DkimResults:
    """The result of each DKIM signature verified, top first; empty: no signature."""

    signatures: tuple[SignatureResult, ...] = ()

    @property
    def passed(self) -> list[str]:
        """The d= domains of the signatures that passed."""
        return [s.domain for s in self.signatures if s.result == "pass"]

    def counted(self) -> Iterable[Series]:
        """Each signature's result in spamgate_auth_results_total; "none" if unsigned."""
        if not self.signatures:
            yield AUTH_RESULTS, ("dkim", "none")
        for s in self.signatures:
            yield AUTH_RESULTS, ("dkim", s.result)


class DkimCheck(Check):
    section = ("dkim", DkimSettings)
    name = "dkim"
    stages = frozenset({Stage.EOD})

    def __init__(self, settings: DkimSettings, resolver: Resolver, services: Services) -> None:
        self.settings = settings
        self.resolver = resolver
        self.services = services
        self.timeout = settings.timeout + 1.0  # the runner's backstop; the check keeps time

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: DkimSettings = config.section("dkim")
        return [cls(s, services.resolver, services)] if s.enabled else []

    async def check(self, ctx: CheckContext) -> Verdict:
        message = ctx.message
        if message is None or ctx.session.relay_permitted:
            return DUNNO
        values = [
            h.value.encode("utf-8", "surrogateescape") for h in message.get_all("DKIM-Signature")
        ][: self.settings.max_signatures]
        if not values:
            return Verdict(result=DkimResults())
        answers: dict[str, KeyAnswer] | None = None
        try:
            async with asyncio.timeout(self.settings.timeout):
                answers = await self._keys(values)
                results = await self._verify(message, answers)
        except TimeoutError:
            why = f"verification took more than {self.settings.timeout:g}s"
            if answers is not None:
                # The keys are in: the time went on our own computation, not on the
                # signer's DNS, and that is no temperror of the sender's making.
                raise VerificationTimeout(f"{why} (the keys were fetched)") from None
            results = [describe(v, "temperror", why) for v in values]
        return Verdict(result=DkimResults(tuple(results)))

    async def _keys(self, values: list[bytes]) -> dict[str, KeyAnswer]:
        names = list(dict.fromkeys(n for n in map(signature_key, values) if n is not None))
        found = await asyncio.gather(
            *(self.resolver.lookup(n, "TXT") for n in names), return_exceptions=True
        )
        answers: dict[str, KeyAnswer] = {}
        for name, answer in zip(names, found, strict=True):
            if isinstance(answer, DnsError):
                answers[name] = answer.kind
            elif isinstance(answer, BaseException):
                raise answer
            elif answer.records:
                # RFC 6376 §3.6.2.2: more than one record is undefined; use the first.
                answers[name] = b"".join(answer.records[0].strings)
            else:
                answers[name] = None
        return answers

    async def _verify(self, message: Message, answers: dict[str, KeyAnswer]) -> list:
        s = self.settings
        # dkimpy reads the header fields as Postfix delivers them
        # (`Message.header_section`), not its own reading of the raw block, which
        # would find fields below a line that ended the header section.
        header = message.header_section
        if message.size <= s.inline_size:
            content = header + message.body
            return verify(content, answers, s.max_signatures, s.min_key_bits)
        loop = asyncio.get_running_loop()
        pool = self.services.processes(s.processes)
        # A spooled message goes by file name: this process never reads its body.
        source: bytes | tuple[bytes, str, int] = (
            (header, message.path, message.body_offset)
            if message.path is not None
            else header + message.body
        )
        try:
            return await loop.run_in_executor(
                pool, verify_message, source, answers, s.max_signatures, s.min_key_bits
            )
        except concurrent.futures.BrokenExecutor as exc:
            raise CheckError(f"a DKIM worker process died: {exc}") from None
