"""rspamd as a scorer: the message to rspamd's /checkv2, at end of data.

The envelope and the client go along as headers (IP, Helo, Hostname, From,
Rcpt, User, Queue-Id), so rspamd's SPF, RBL and other rules see what they would
see as a milter. By default (`mode = "score"`) rspamd's score, times `weight`,
is the symbol RSPAMD in spamgate's scoring; with `mode = "action"` rspamd's
own action is followed: reject → 554 5.7.1, soft reject and greylist → 451
4.7.1, add header and rewrite subject → an `X-Spam: Yes` header (spamgate only
adds header fields; it never rewrites the Subject). The symbols rspamd reports
are shown as `RSPAMD_<NAME>` symbols of score 0 (X-Spam-Symbols, explain), and
those named in `count_symbols` are counted by name.

A message larger than `max_size` is not sent. rspamd down or slow is a check
failure (`on_error`), logged and counted once per outage. The check runs
beside the other end-of-data checks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..config.settings import positive, setting
from ..model import Stage
from ..pipeline.check import Check, CheckContext
from ..pipeline.verdict import DUNNO, Action, Symbol, Verdict
from ..reply import Reply
from .engines.backend import Outage, scanner_symbols
from .engines.rspamdclient import RspamdError, checkv2

if TYPE_CHECKING:
    from ..config import Config
    from ..services import Services

ACTIONS = ("no action", "greylist", "add header", "rewrite subject", "soft reject", "reject")


def _url(value: str) -> str | None:
    if not value or value.startswith(("http://", "https://")):
        return None
    if value.startswith("unix:/"):
        return None
    return f'"{value}" is not "http://host:port" or "unix:/path"'


def _names(value: list[str]) -> str | None:
    for item in value:
        if not item or not item.replace("_", "").isalnum():
            return f'"{item}" is not a symbol name'
    return None


@dataclass(frozen=True)
class RspamdSettings:
    url: str = setting(
        "",
        'rspamd\'s normal worker, "http://127.0.0.1:11333", or "unix:/path" to its '
        "socket; empty: rspamd off.",
        check=_url,
    )
    mode: Literal["score", "action"] = setting(
        "score",
        "\"score\": rspamd's score, times weight, is the symbol RSPAMD in spamgate's "
        'scoring; "action": rspamd\'s action is followed (reject 554, soft reject and '
        "greylist 451, add header an X-Spam: Yes header).",
    )
    weight: float = setting(1.0, "Multiplies rspamd's score into the RSPAMD symbol.")
    password: str = setting("", "Sent as the Password header, if rspamd's worker wants one.")
    max_size: int = setting(10485760, "Larger messages are not sent to rspamd.", check=positive)
    timeout: float = setting(
        20.0, "Seconds for one scan, connection included (then on_error).", check=positive
    )
    count_symbols: list[str] = setting(
        [],
        "rspamd symbols counted in spamgate_scanner_symbols_total (a closed set, e.g. "
        '["GTUBE", "BAYES_SPAM"]).',
        check=_names,
    )
    on_error: Literal["continue", "tempfail"] = setting(
        "continue", 'rspamd down, failing or slow: "continue" or "tempfail" (451 4.3.0).'
    )


@dataclass(frozen=True)
class RspamdResult:
    action: str = "no action"
    score: float = 0.0
    required: float = 0.0
    symbols: tuple[tuple[str, float], ...] = ()
    skipped: bool = False
    counting: frozenset[str] = frozenset()

    def counted(self):
        if self.skipped:
            yield "spamgate_content_scans_total", ("rspamd", "skipped")
            return
        label = self.action.replace(" ", "_") if self.action in ACTIONS else "no_action"
        yield "spamgate_content_scans_total", ("rspamd", label)
        yield "spamgate_scanner_score", ("rspamd",), self.score
        for name, _ in self.symbols:
            if name in self.counting:
                yield "spamgate_scanner_symbols_total", ("rspamd", name)

    def explain(self) -> list[str]:
        if self.skipped:
            return ["rspamd: not scanned"]
        shown = ", ".join(f"{n}({s:g})" for n, s in self.symbols[:30]) or "no symbols"
        return [f"rspamd: {self.action}, score {self.score:g} / {self.required:g}; {shown}"]


class RspamdCheck(Check):
    section = ("rspamd", RspamdSettings)
    name = "rspamd"
    stages = frozenset({Stage.EOD})
    replay_needs = "daemon"
    concurrent = True

    def __init__(self, settings: RspamdSettings) -> None:
        self.settings = settings
        self.on_error = settings.on_error
        self.timeout = settings.timeout + 1.0  # the runner's backstop; the check keeps time
        self.outage = Outage(self.name, f"rspamd at {settings.url}")
        self.counting = frozenset(settings.count_symbols)

    @classmethod
    def from_config(cls, config: Config, services: Services) -> list[Check]:
        s: RspamdSettings = config.section("rspamd")
        return [cls(s)] if s.url else []

    def metric_series(self):
        for action in (*ACTIONS, "skipped"):
            yield "spamgate_content_scans_total", ("rspamd", action.replace(" ", "_"))
        yield "spamgate_backend_outages_total", ("rspamd",)
        for name in sorted(self.counting):
            yield "spamgate_scanner_symbols_total", ("rspamd", name)

    @staticmethod
    def envelope(ctx: CheckContext) -> list[tuple[str, str]]:
        client = ctx.session.client
        headers = [("IP", str(client.address)), ("Queue-Id", ctx.session.id)]
        if client.helo:
            headers.append(("Helo", client.helo))
        if not client.name.startswith("["):
            headers.append(("Hostname", client.name))
        if client.login:
            headers.append(("User", client.login))
        txn = ctx.transaction
        if txn is not None:
            headers.append(("From", txn.mail_from or "<>"))
            headers += [("Rcpt", r.address) for r in txn.accepted_recipients]
        return headers

    async def check(self, ctx: CheckContext) -> Verdict:
        message = ctx.message
        if message is None:
            return DUNNO
        s = self.settings
        if message.size > s.max_size:
            return Verdict(result=RspamdResult(skipped=True))
        try:
            async with asyncio.timeout(s.timeout):
                answer = await checkv2(s.url, message, self.envelope(ctx), s.timeout, s.password)
        except TimeoutError:
            raise self.outage.failed(f"no answer in {s.timeout:g}s", timeout=True) from None
        except RspamdError as exc:
            raise self.outage.failed(str(exc)) from None
        self.outage.answered()
        ranked = sorted(answer.symbols.items(), key=lambda kv: -abs(kv[1]))
        result = RspamdResult(
            answer.action,
            answer.score,
            answer.required,
            tuple(ranked),
            False,  # rspamd's own is_skipped (GTUBE, settings) still has an action
            self.counting,
        )
        shown = scanner_symbols("RSPAMD", [name for name, _ in ranked])
        if s.mode == "score":
            scored = (Symbol("RSPAMD", round(answer.score * s.weight, 2)), *shown)
            return Verdict(symbols=scored, result=result)
        return self.follow(answer.action, answer.score, shown, result)

    @staticmethod
    def follow(
        action: str, score: float, shown: tuple[Symbol, ...], result: RspamdResult
    ) -> Verdict:
        rule = f"rspamd:{action.replace(' ', '_')}"
        if action == "reject":
            text = f"Message refused as spam (rspamd score {score:g})"
            reply = Reply.make(554, text, "5.7.1")
            return Verdict(Action.REJECT, reply, symbols=shown, rule=rule, result=result)
        if action in ("soft reject", "greylist"):
            reply = Reply.make(451, "Message deferred as possible spam, try again later", "4.7.1")
            return Verdict(Action.DEFER, reply, symbols=shown, rule=rule, result=result)
        if action in ("add header", "rewrite subject"):
            return Verdict(headers=(("X-Spam", "Yes"),), symbols=shown, rule=rule, result=result)
        return Verdict(symbols=shown, result=result)
