"""The runner: every decision, a check's or the core's, taken the same way.

No socket and no session driver: a stage's context, a ledger, and the runner's
outcome, with the counters it is the only one to touch.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from spamgate.app import loads
from spamgate.model import Client, Recipient, Session, Stage, Transaction
from spamgate.pipeline.check import Check, CheckContext
from spamgate.pipeline.ledger import Ledger
from spamgate.pipeline.runner import CorePolicy, Pipeline
from spamgate.pipeline.verdict import DUNNO, Action, CheckFailures, Symbol, Verdict, reject

from ...conftest import sample

BASE = '[server]\nrelay_domains = ["example.test"]\nmynetworks = ["127.0.0.1/32"]\n'


def verdicts(stage: str, check: str, action: str) -> float:
    return sample("spamgate_verdicts_total", stage=stage, check=check, action=action)


def would(stage: str, check: str, action: str) -> float:
    return sample("spamgate_monitor_verdicts_total", stage=stage, check=check, action=action)


class Found:
    """A result that names its own series, as checks' results do."""

    def counted(self) -> Iterable[tuple[str, tuple[str, ...]]]:
        yield "spamgate_auth_results_total", ("spf", "neutral")


class Scripted(Check):
    """Decides what it is told to, at the stages it is told to."""

    name = "scripted"

    def __init__(self, stages: set[Stage], verdict: Verdict | Exception) -> None:
        self.stages = frozenset(stages)  # type: ignore[misc]
        self.verdict = verdict

    @classmethod
    def from_config(cls, config, services):  # type: ignore[override]
        return []

    async def check(self, ctx: CheckContext) -> Verdict:
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


def pipeline(*checks: Check, extra: str = "", monitor: bool = False, skip=()) -> Pipeline:
    config = loads(BASE + extra)
    return Pipeline(
        list(checks), CorePolicy.from_config(config), monitor=monitor, skip=frozenset(skip)
    )


def session(address: str = "192.0.2.7") -> Session:
    return Session("RUNNER", Client(ipaddress.ip_address(address), 4000, helo="c.example.net"))


def rcpt_context(s: Session, to: str = "u@example.test", held=None) -> CheckContext:
    txn = s.transaction or Transaction("a@example.org")
    s.transaction = txn
    return CheckContext(Stage.RCPT, s, txn, Recipient(to), held=held)


async def test_monitor_mode_never_spares_relay_control() -> None:
    p = pipeline(Scripted({Stage.RCPT}, reject("no", 550, rule="s:1")), monitor=True)
    s, ledger = session(), Ledger({})
    before = (would("rcpt", "scripted", "reject"), verdicts("rcpt", "relay", "reject"))
    outcome = await p.run(rcpt_context(s), ledger)
    assert outcome.final is None  # the check's refusal is only a "would"
    assert would("rcpt", "scripted", "reject") == before[0] + 1
    outcome = await p.run(rcpt_context(s, "x@elsewhere.test"), ledger)
    assert outcome.decider == "relay" and outcome.refusal is not None
    assert str(outcome.refusal.reply) == "554 5.7.1 <x@elsewhere.test>: Relay access denied"
    assert verdicts("rcpt", "relay", "reject") == before[1] + 1


async def test_a_refusal_at_helo_is_held_and_given_at_each_rcpt_counted_once() -> None:
    p = pipeline(Scripted({Stage.HELO}, reject("Bad HELO", 550, rule="helo:1")))
    s, ledger = session(), Ledger({})
    before = verdicts("helo", "scripted", "reject")
    outcome = await p.run(CheckContext(Stage.HELO, s), ledger)
    assert outcome.held and outcome.refusal is None  # the front end says 250
    assert ledger.held.any is not None
    for _ in range(2):
        given = await p.run(rcpt_context(s, held=ledger.held.any), ledger)
        assert given.decider == "delayed" and str(given.refusal.reply) == "550 5.7.1 Bad HELO"
    assert verdicts("helo", "scripted", "reject") == before + 1  # where it was decided
    ledger.forget_helo()  # a new HELO: what the last one decided no longer holds
    assert ledger.held.any is None


async def test_without_delay_reject_a_refusal_is_given_where_it_is_decided() -> None:
    check = Scripted({Stage.HELO}, reject("Bad HELO", 550))
    p = pipeline(check, extra="[smtp]\ndelay_reject = false\n")
    outcome = await p.run(CheckContext(Stage.HELO, session()), Ledger({}))
    assert not outcome.held and outcome.refusal is not None


async def test_the_score_still_refuses_a_recipient_a_check_held() -> None:
    hold = Verdict(Action.HOLD, symbols=(Symbol("BAD", 20.0),), rule="s:hold")
    p = pipeline(Scripted({Stage.RCPT}, hold))
    s, ledger = session(), Ledger({})
    outcome = await p.run(rcpt_context(s), ledger)
    assert outcome.decider == "score"
    assert str(outcome.refusal.reply) == "550 5.7.1 Message refused as spam (score 20.0)"
    assert ledger.held.txn_disposal is hold  # the HOLD stands for the message


async def test_authenticated_clients_skip_checks_never_the_core() -> None:
    p = pipeline(Scripted({Stage.RCPT}, reject("no", 550)), skip=["all"])
    s, ledger = session(), Ledger({})
    assert (await p.run(rcpt_context(s), ledger, authenticated=True)).final is None
    outcome = await p.run(rcpt_context(s, "x@elsewhere.test"), ledger, authenticated=True)
    assert outcome.decider == "relay"  # relay_permitted is the session's to say, not skip's


async def test_a_check_that_fails_gets_its_on_error_and_is_recorded() -> None:
    check = Scripted({Stage.RCPT}, RuntimeError("broken"))
    check.on_error = "tempfail"
    p = pipeline(check)
    s, ledger = session(), Ledger({})
    before = sample("spamgate_check_errors_total", check="scripted", kind="exception")
    outcome = await p.run(rcpt_context(s), ledger)
    assert str(outcome.refusal.reply) == (
        "451 4.3.0 Temporary failure in a message check, try again later"
    )
    assert "scripted" in s.transaction.results.get(CheckFailures)
    assert sample("spamgate_check_errors_total", check="scripted", kind="exception") == before + 1


async def test_results_are_recorded_and_name_their_series() -> None:
    p = pipeline(Scripted({Stage.HELO}, Verdict(result=Found())))
    s = session()
    before = sample("spamgate_auth_results_total", method="spf", result="neutral")
    outcome = await p.run(CheckContext(Stage.HELO, s), Ledger({}))
    assert outcome.final is None and s.results.get(Found) is not None
    assert sample("spamgate_auth_results_total", method="spf", result="neutral") == before + 1


async def test_the_tag_is_a_would_in_monitor_mode() -> None:
    scored = Verdict(symbols=(Symbol("SOME", 6.0),))
    for monitor in (False, True):
        p = pipeline(Scripted({Stage.EOD}, scored), monitor=monitor)
        s, ledger = session(), Ledger({})
        s.transaction = Transaction("a@example.org")
        before = would("eod", "score", "tag")
        await p.run(CheckContext(Stage.EOD, s, s.transaction), ledger)
        tagged = [name for name, _ in ledger.txn_headers]
        assert tagged == ([] if monitor else ["X-Spam-Flag", "X-Spam-Score", "X-Spam-Symbols"])
        assert would("eod", "score", "tag") == before + (1 if monitor else 0)


def test_the_cores_series_exist_from_the_start() -> None:
    series = {(stage, label, action) for stage, label, action, _ in pipeline().series()}
    assert {
        ("rcpt", "relay", "reject"),
        ("mail", "limits", "reject"),
        ("rcpt", "limits", "defer"),
        ("eod", "limits", "reject"),
        ("eod", "protocol", "reject"),
        ("connect", "protocol", "reject"),
        ("connect", "protocol", "disconnect"),
        ("rcpt", "score", "reject"),
        ("eod", "score", "tag"),
    } <= series


async def test_no_opinion_leaves_the_stage_open() -> None:
    p = pipeline(Scripted({Stage.CONNECT}, DUNNO))
    outcome = await p.run(CheckContext(Stage.CONNECT, session()), Ledger({}))
    assert (outcome.final, outcome.decider, outcome.held) == (None, None, False)


async def test_a_pipeline_that_counts_nothing_decides_the_same() -> None:
    """A replay's pipeline (counted=False) decides as the running one does, and
    leaves the metrics of the process alone."""
    found = Verdict(result=Found(), hits=(("client", 3),))
    for counted in (True, False):
        p = pipeline(
            Scripted({Stage.HELO}, found),
            Scripted({Stage.RCPT}, reject("no", 550, rule="s:1")),
        )
        p = Pipeline(p.checks, p.core, counted=counted)
        s, ledger = session(), Ledger({})
        before = (
            verdicts("rcpt", "scripted", "reject"),
            sample("spamgate_auth_results_total", method="spf", result="neutral"),
            sample("spamgate_rule_hits_total", table="client", rule="3"),
        )
        await p.run(CheckContext(Stage.HELO, s), ledger)
        outcome = await p.run(rcpt_context(s), ledger)
        assert (outcome.decider, str(outcome.refusal.reply)) == ("scripted", "550 5.7.1 no")
        assert s.results.get(Found) is not None
        after = (
            verdicts("rcpt", "scripted", "reject"),
            sample("spamgate_auth_results_total", method="spf", result="neutral"),
            sample("spamgate_rule_hits_total", table="client", rule="3"),
        )
        assert after == tuple(b + (1 if counted else 0) for b in before)
