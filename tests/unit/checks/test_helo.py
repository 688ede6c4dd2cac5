"""[helo]: the HELO name's form judged as Postfix's reject_invalid_helo_hostname and
reject_non_fqdn_helo_hostname judge it, through the registry and the runner."""

from __future__ import annotations

import ipaddress

import pytest

from spamgate.app import DEFAULT_CHECKS, build_policy, loads
from spamgate.checks.helo import HeloSyntaxCheck, form
from spamgate.model import Client, Session, Stage
from spamgate.pipeline.check import CheckContext
from spamgate.pipeline.ledger import Ledger
from spamgate.services import Services


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("mail.example.com", "fqdn"),
        ("mail.example.com.", "fqdn"),
        ("my_host.example.net", "fqdn"),
        ("localhost", "single"),
        ("[192.0.2.1]", "literal"),
        ("[IPv6:2001:db8::1]", "literal"),
        ("[2001:db8::1]", "invalid"),  # an IPv6 literal says so
        ("[IPv6:192.0.2.1]", "invalid"),
        ("192.0.2.1", "invalid"),  # an address without its brackets
        ("-bad-.example.com", "invalid"),
        ("bad!name", "invalid"),
        ("x" * 64 + ".example", "invalid"),
        ("", "invalid"),
    ],
)
def test_forms(name: str, kind: str) -> None:
    assert form(name) == kind


async def helo(extra: str, name: str, *, trusted: bool = False):
    config = loads(f'[server]\nmynetworks = ["127.0.0.1/32"]\n{extra}')
    services = Services.build(config)
    pipeline = build_policy(config, services).pipeline
    address = "127.0.0.1" if trusted else "192.0.2.7"
    session = Session("HELO", Client(ipaddress.ip_address(address), 4000, helo=name))
    session.relay_permitted = trusted
    ledger = Ledger(pipeline.symbol_scores)
    outcome = await pipeline.run(CheckContext(Stage.HELO, session), ledger)
    await services.aclose()
    return outcome, ledger


def test_registered_and_off_by_default() -> None:
    assert HeloSyntaxCheck in DEFAULT_CHECKS
    config = loads("")
    assert HeloSyntaxCheck.from_config(config, Services.build(config)) == []


async def test_postfix_replies_held_for_the_first_rcpt() -> None:
    on = '[helo]\ninvalid = "reject"\nnon_fqdn = "reject"\n'
    _, ledger = await helo(on, "bad!name")
    assert str(ledger.held.any.reply) == "501 5.5.2 <bad!name>: Helo command rejected: Invalid name"
    _, ledger = await helo(on, "localhost")
    assert str(ledger.held.any.reply) == (
        "504 5.5.2 <localhost>: Helo command rejected: need fully-qualified hostname"
    )
    for good in ("mail.example.com", "[192.0.2.1]"):
        outcome, ledger = await helo(on, good)
        assert outcome.final is None and ledger.held.any is None
    outcome, ledger = await helo(on, "localhost", trusted=True)  # ours: not judged
    assert ledger.held.any is None


async def test_scored() -> None:
    _, ledger = await helo('[helo]\nnon_fqdn = "score"\nnon_fqdn_score = 2.5\n', "localhost")
    assert [(s.name, s.score) for s in ledger.scorer.symbols()] == [("HELO_NOT_FQDN", 2.5)]
