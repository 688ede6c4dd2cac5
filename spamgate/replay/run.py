"""`spamgate replay`: every recorded transaction again, through a candidate configuration.

The replay is the session driver's third front end (after the SMTP proxy and
`spamgate explain`): each record becomes one session, driven event by event as
the client drove it (connect, the HELO names, TLS and AUTH facts, MAIL with its
parameters, each RCPT, DATA, the message), through the real driver, pipeline and
checks of the candidate configuration (`app.build`). Only what lies outside
spamgate comes from the record (`sources`): DNS answers, the state store's
answers, the upstream's replies. At end of data, a check whose input the record
does not hold (the body, without store_messages; a scanner daemon) gives the
verdict it recorded (`Check.replay_needs`); everything else is decided anew.

What the candidate decides for a record (`after`) is compared with what the
record says was decided (`before`): outcome, each recipient's reply code, the
code that ended it, the X-Spam tag. `diff.Diff` sums them up.
"""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from .. import app
from ..config import Config
from ..flow.disposal import Quarantine
from ..message import Message
from ..model import Client, IPAddress, Session, Stage, TLSInfo
from ..pipeline.check import Check, CheckContext, CheckError, TransactionEnd
from ..pipeline.entry import CoreEntry
from ..pipeline.observer import Observer
from ..pipeline.verdict import DUNNO, Action, Symbol, Verdict
from ..reply import Reply
from ..resolver import DnsResolver
from ..upstream.dry import DryUpstream
from .records import Item
from .results import ResultError, rebuild
from .sources import PLAYING, Playing, ReplayError, ReplayResolver, ReplayStore, ReplayUpstream

REFUSED = frozenset({"rejected", "tempfailed"})
DISPOSED = frozenset({"discarded", "quarantined"})
_MULTIPART = re.compile(r"^content-type:\s*(multipart|message)/", re.IGNORECASE | re.MULTILINE)


class InlineExecutor(concurrent.futures.Executor):
    """Runs a job at once in the calling thread: a replay has no other session to
    keep waiting, and pyspf then costs no thread hop."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class RecordedFailure(CheckError):
    """A check that failed when recorded, failing again in the replay (its on_error
    as the candidate sets it then applies)."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"failed when recorded ({kind})", quiet=True)
        self.kind = kind


class AsRecorded(Check):
    """An end-of-data check, run again when the record holds what it needs, else
    given its recorded verdict (`Check.replay_needs`)."""

    def __init__(self, inner: Check) -> None:
        self.inner = inner
        self.name = inner.label  # type: ignore[misc]
        self.stages = inner.stages  # type: ignore[misc]
        self.timeout = inner.timeout
        self.on_error = inner.on_error
        self.concurrent = inner.concurrent  # type: ignore[misc]
        self.needs = inner.replay_needs

    @classmethod
    def from_config(cls, config: Config, services: Any) -> list[Check]:
        return []

    def metric_series(self):  # type: ignore[no-untyped-def]
        return self.inner.metric_series()

    def failure(self, kind: str) -> object | None:
        return self.inner.failure(kind)

    async def check(self, ctx: CheckContext) -> Verdict:
        playing = PLAYING.get()
        if ctx.stage is not Stage.EOD or can_run(playing.record, self.needs):
            return await self.inner.check(ctx)
        failed = dict(map(tuple, playing.record.get("failures", ())))
        kind = failed.get(self.name)
        if kind is not None:
            if kind == "timeout":
                raise TimeoutError
            raise RecordedFailure(kind)
        found = [
            v for v in playing.record["verdicts"] if v["stage"] == "eod" and v["entry"] == self.name
        ]
        if not found:
            playing.note_unknown(
                f"check {self.name} (not run when recorded; needs the {self.needs})"
            )
            return DUNNO
        try:
            return verdict_from(found[-1])
        except ReplayError as exc:
            # The record's fault, not the check's (which the runner would take an
            # exception for): the record is refused once its run is over.
            playing.broken = str(exc)
            return DUNNO


def can_run(record: dict[str, Any], needs: str) -> bool:
    """Does the record hold what a check at end of data reads?"""
    message = record.get("message")
    if needs == "daemon" or message is None:
        return False
    if "body" in message:
        return True
    if needs != "header" or message.get("headers_cut"):
        return False
    return not _MULTIPART.search(message["headers"])


def reply_from(r: list | None) -> Reply | None:
    return None if r is None else Reply(r[0], r[1], tuple(r[2]))


def verdict_from(v: dict[str, Any]) -> Verdict:
    """A recorded verdict as the check returned it (its result rebuilt as its type)."""
    try:
        result = rebuild(v["result"]) if "result" in v else None
    except ResultError as exc:
        raise ReplayError(f"verdict of {v['entry']}: {exc}") from None
    return Verdict(
        Action(v["action"]),
        reply_from(v.get("reply")),
        headers=tuple((h[0], h[1]) for h in v.get("headers", ())),
        symbols=tuple(Symbol(s[0], float(s[1])) for s in v.get("symbols", ())),
        warn=v.get("warn"),
        rule=v.get("rule"),
        result=result,
        monitor=bool(v.get("monitor")),
        would=tuple(
            Verdict(Action(w["action"]), reply_from(w.get("reply")), rule=w.get("rule"))
            for w in v.get("would", ())
        ),
        hits=tuple((h[0], h[1]) for h in v.get("hits", ())),
    )


def build(
    config: Config, checks: app.Checks = app.DEFAULT_CHECKS, *, live: bool = False
) -> app.App:
    """spamgate as the candidate configuration makes it, on the record's answers."""
    live_resolver = DnsResolver(config.dns) if live else None
    resolver = ReplayResolver(config.dns.lifetime, live_resolver)
    built = app.build(
        config,
        checks=checks,
        resolver=resolver,
        state=ReplayStore(),
        upstream=ReplayUpstream(),
        disposal=Quarantine(DryUpstream()),
        capture=False,
        # Nothing exports a replay's metrics, and its decisions are not the
        # running filter's: counting them cost about 8% of its time.
        counted=False,
    )
    built.services.threads.shutdown(wait=False)
    built.services.threads = InlineExecutor()  # type: ignore[assignment]
    policy = built.build_policy(config)  # its checks on the inline executor
    wrapped = [AsRecorded(c) if Stage.EOD in c.stages else c for c in policy.pipeline.checks]
    pipeline = policy.pipeline.with_checks(wrapped)
    # Nothing learns from a replayed outcome: the record says what the store said.
    pipeline.observers = []
    built.runtime.swap(dataclasses.replace(policy, pipeline=pipeline))
    return built


# -- what was decided ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one transaction ended, and which rule decided it."""

    label: str  # spamgate_transactions_total's outcome; "envelope": see Watch
    code: int | None  # the reply that ended it (the message's, or the refusal's)
    rcpts: tuple[int | None, ...]  # each recipient's reply code, in order
    tagged: bool  # X-Spam-Flag: YES
    score: float
    rule: str | None  # the rule (or entry) of the refusal, if refused
    stage: str | None  # where that refusal was decided
    reply: str = ""  # its reply, as text
    rcpt_rules: tuple[str | None, ...] = ()  # the rule refusing each recipient, if any

    @property
    def refused(self) -> bool:
        return self.label in REFUSED

    @property
    def key(self) -> tuple:
        return (self.label, self.code, self.rcpts, self.tagged)

    def describe(self) -> str:
        if self.label == "envelope":
            return "accepted at RCPT (the client sent no message then: no end of data to replay)"
        tag = ", tagged" if self.tagged else ""
        where = f" at {self.stage}" if self.stage else ""
        rule = f" (rule {self.rule})" if self.rule else ""
        text = f" {self.reply}" if self.reply else ""
        return f"{self.label}{tag}{text}{where}{rule}"


def _text(r: list | Reply | None) -> str:
    if r is None:
        return ""
    if isinstance(r, Reply):
        return f"{r.code} {r.enhanced + ' ' if r.enhanced else ''}{r.text}".strip()
    return f"{r[0]} {r[1] + ' ' if r[1] else ''}{' '.join(r[2])}".strip()


def _deciding(steps: list[tuple[str, Any, Any]], accepted: bool) -> tuple[str, Any] | None:
    """The refusal that decided a transaction, from its replies in order as
    (stage, reply, ours): the first of ours, but a refused HELO the client got past
    and a refused recipient beside an accepted one decide nothing."""
    helos = [i for i, step in enumerate(steps) if step[0] == "helo"]
    for i, (stage, reply, ours) in enumerate(steps):
        if not ours:
            continue
        if stage == "helo" and i != helos[-1]:
            continue
        if stage == "rcpt" and accepted:
            continue
        return stage, reply
    return None


def before(record: dict[str, Any]) -> Outcome:
    """The outcome the record says was decided."""
    end = record["end"]
    rcpts = record.get("rcpt", [])
    codes = tuple((r.get("reply") or [None])[0] for r in rcpts)
    steps: list[tuple[str, Any, Any]] = [("connect", record.get("connect"), True)]
    steps += [("helo", h[2], True) for h in record["client"]["helo"]]
    mail = record.get("mail")
    if mail is not None:
        steps.append(("mail", mail.get("reply"), mail.get("by") == "us"))
    steps += [("rcpt", r.get("reply"), r.get("by") == "us") for r in rcpts]
    if "data" in record:
        steps.append(("data", record["data"].get("reply"), record["data"].get("by") == "us"))
    steps.append(("eod", end.get("reply"), end.get("by") == "us"))
    steps = [(st, r, ours) for st, r, ours in steps if r is not None and r[0] >= 400]
    refusal = _deciding(steps, any(c is not None and c // 100 == 2 for c in codes))
    label = end["outcome"]
    rule = stage = None
    if refusal is not None and label in REFUSED:
        stage, r = refusal
        rule = _recorded_rule(record, r)
    elif label in DISPOSED and record.get("mode") != "monitor":
        taken = [
            v
            for v in record["verdicts"]
            if v["action"] in ("discard", "hold") and not v.get("monitor")
        ]
        if taken:
            rule, stage = taken[-1].get("rule") or taken[-1]["entry"], taken[-1]["stage"]
    tagged = record.get("mode") != "monitor" and any(
        v.get("rule") == "score:tag" and v["action"] == "tag" and not v.get("monitor")
        for v in record["verdicts"]
    )
    code = end["reply"][0] if end.get("reply") else (refusal[1][0] if refusal else None)
    rcpt_rules = tuple(
        _recorded_rule(record, r["reply"])
        if r.get("by") == "us" and r.get("reply") and r["reply"][0] >= 400
        else None
        for r in rcpts
    )
    return Outcome(
        label,
        code,
        codes,
        tagged,
        float(end.get("score", 0.0)),
        rule,
        stage,
        _text(refusal[1]) if label in REFUSED and refusal is not None else _text(end.get("reply")),
        rcpt_rules,
    )


def _recorded_rule(record: dict[str, Any], reply: list) -> str | None:
    for v in reversed(record["verdicts"]):
        if v.get("reply") == reply and not v.get("monitor"):
            return v.get("rule") or v["entry"]
    return None


class Watch(Observer):
    """What the candidate decides in one replayed session."""

    __slots__ = ("_monitor", "disposed", "end", "recent", "replies", "tagged")

    def __init__(self, monitor: bool) -> None:
        self.recent: list[tuple[Stage, str, Verdict]] = []
        # (event, reply, the rule or entry that gave it, its stage) in order
        self.replies: list[tuple[str, Reply | None, str | None, str | None]] = []
        self.end: TransactionEnd | None = None
        self.tagged = False
        self.disposed: tuple[str, str] | None = None  # (rule, stage) of a DISCARD or HOLD
        self._monitor = monitor

    def command(self, event: str, args: tuple[object, ...]) -> None:
        self.recent = []

    def verdict(
        self, stage: Stage, entry: Check | CoreEntry, verdict: Verdict, seconds: float
    ) -> None:
        self.recent.append((stage, entry.label, verdict))
        if verdict.rule == "score:tag" and verdict.action is Action.TAG:
            self.tagged = not (self._monitor or verdict.monitor)
        elif verdict.action in (Action.DISCARD, Action.HOLD) and not (
            self._monitor or verdict.monitor
        ):
            self.disposed = (verdict.rule or entry.label, stage.value)

    def reply(self, event: str, reply: Reply | None) -> None:
        rule = stage = None
        if reply is not None and reply.code >= 400:
            found = next((x for x in reversed(self.recent) if x[2].reply is reply), None)
            if found is None:  # a temporary refusal at connect, given as 421
                found = next((x for x in reversed(self.recent) if x[2].action.refuses), None)
            if found is not None:
                rule, stage = found[2].rule or found[1], found[0].value
        self.replies.append((event, reply, rule, stage))

    def transaction_end(self, event: TransactionEnd) -> None:
        self.end = event


def after(watch: Watch, note: str | None) -> Outcome:
    """The candidate's outcome (`note` "envelope": the recipients were accepted but
    the record holds no message to go on with)."""
    replies = watch.replies
    codes = tuple(r.code if r is not None else None for e, r, _, _ in replies if e == "rcpt")
    ends = [r for e, r, _, _ in replies if e in ("message", "data") and r is not None]
    steps = [
        (event if event != "message" else "eod", reply, rule is not None or event == "connect")
        for event, reply, rule, _ in replies
        if reply is not None and reply.code >= 400
    ]
    refusal = _deciding(steps, any(c is not None and c // 100 == 2 for c in codes))
    if watch.end is not None:
        label, score = watch.end.outcome, watch.end.score
    elif refusal is not None:
        label = "tempfailed" if refusal[1].code < 500 else "rejected"
        score = 0.0
    else:
        label, score = "aborted", 0.0
    if note == "envelope" and label == "aborted":
        label = "envelope"
    rule = stage = None
    if refusal is not None and label in REFUSED:
        found = next(x for x in replies if x[1] is refusal[1])
        rule, stage = found[2], found[3] or refusal[0]
    elif label in DISPOSED and watch.disposed is not None:
        rule, stage = watch.disposed
    end = ends[-1] if ends else None
    code = end.code if end is not None else (refusal[1].code if refusal else None)
    decided = refusal[1] if label in REFUSED and refusal is not None else end
    rcpt_rules = tuple(rule for e, _, rule, _ in replies if e == "rcpt")
    return Outcome(label, code, codes, watch.tagged, score, rule, stage, _text(decided), rcpt_rules)


# -- one record ------------------------------------------------------------------------


def _message(m: dict[str, Any]) -> Message:
    header = m["headers"].encode(m.get("encoding") or "utf-8", "surrogateescape")
    body = base64.b64decode(m["body"]) if "body" in m else b""
    return Message(header + body)


async def play(
    built: app.App, record: dict[str, Any], address: IPAddress, pregreet: str
) -> tuple[Watch, str | None]:
    """Drive one recorded session through the candidate (`address`: its client's,
    parsed when the record was read); its Watch, and a note."""
    c = record["client"]
    client = Client(address, c["port"], name=c["name"])
    local = c.get("local")
    if local:
        host, _, port = local.rpartition(":")
        try:
            client.local_address = ipaddress.ip_address(host)
            client.local_port = int(port)
        except ValueError:
            pass
    session = Session(id=record["sid"], client=client)
    watch = Watch(built.policy.pipeline.monitor)
    driver = built.driver(session, observer=watch, lookup_name=False)
    try:
        reply = await driver.connect()
        if c.get("pregreet"):
            reply = await driver.client_talked_first(pregreet) or reply
        if reply is not None:
            return watch, None  # refused at connect: 421 closes, 554 answers 503 to all else
        tls = c.get("tls")
        if tls is not None:
            client.tls = TLSInfo(tls["version"], tls["cipher"], tls.get("bits"))
        for name, esmtp, _ in c["helo"]:
            reply = await driver.helo(name, esmtp)
            if reply is not None and reply.closes:
                return watch, None
        if c.get("login") is not None:
            client.login = c["login"]
            session.relay_permitted = True
        mail = record.get("mail")
        if mail is None or client.helo is None:
            return watch, None
        reply = await driver.mail(mail["from"], tuple(mail["params"]), mail["keywords"])
        if reply.code // 100 != 2:
            return watch, None
        for r in record["rcpt"]:
            reply = await driver.rcpt(r["to"], tuple(r["params"]))
            if reply.closes:
                return watch, None
        txn = session.transaction
        if txn is None or not txn.accepted_recipients:
            return watch, None  # the front end says 554 to DATA itself
        data = record.get("data")
        if data is None:  # the client did not send DATA then (all refused, or it quit)
            rcpts_refused = all((r.get("reply") or [500])[0] >= 400 for r in record["rcpt"])
            return watch, "envelope" if rcpts_refused else None
        reply = await driver.data()
        if reply is not None:
            return watch, None
        if record.get("content_refused"):
            await driver.refuse_content(record["content_refused"])
            return watch, None
        message = record.get("message")
        if message is None:  # DATA refused then, or the client went away during it
            refused = data.get("reply") is not None and data["reply"][0] >= 400
            return watch, "envelope" if refused else None
        await driver.message(_message(message))
        return watch, None
    finally:
        await driver.close("replay")


@dataclass(slots=True)
class Replayed:
    """One record, replayed: where it came from, before, after, what was missing."""

    item: Item
    before: Outcome
    after: Outcome
    unknown: tuple[str, ...]
    live: int
    assumed: int

    @property
    def record(self) -> dict[str, Any]:
        assert self.item.record is not None
        return self.item.record


async def replay_one(built: app.App, item: Item, pregreet: str) -> Replayed | Item:
    """The record of `item` replayed, or the item with the reason it could not be."""
    record, address = item.record, item.address
    assert record is not None and address is not None
    playing = Playing(record)
    previous, PLAYING.now = PLAYING.now, playing
    try:
        watch, note = await play(built, record, address, pregreet)
        was = before(record)
    except (ReplayError, ResultError) as exc:
        return Item(item.path, item.line, None, f"{item.where}: cannot be replayed: {exc}")
    except Exception as exc:  # a record that drives the driver where no client could
        what = f"{type(exc).__name__}: {exc}"
        return Item(item.path, item.line, None, f"{item.where}: cannot be replayed ({what})")
    finally:
        PLAYING.now = previous
    if playing.broken is not None:
        where = f"{item.where}: cannot be replayed: {playing.broken}"
        return Item(item.path, item.line, None, where)
    return Replayed(
        item, was, after(watch, note), tuple(playing.unknown), len(playing.live), playing.assumed
    )
