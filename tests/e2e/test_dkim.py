"""DKIM against a real DNS server: messages signed here with keys made here, the
keys published by the test DNS responder, every signature verified."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
from collections.abc import AsyncIterator

import dkim.canonicalization
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import spamgate.checks.dkim
from spamgate import metrics
from spamgate.app import build_policy, loads
from spamgate.checks.dkim import DkimResults
from spamgate.checks.dmarc import DmarcResults
from spamgate.checks.engines import dkimverify
from spamgate.message import Message
from spamgate.model import Client, Session, Stage, Transaction
from spamgate.pipeline.check import CheckContext
from spamgate.pipeline.ledger import Ledger
from spamgate.pipeline.policy import Policy
from spamgate.pipeline.verdict import Action, CheckFailures
from spamgate.services import Services
from spamgate.spool import Spool
from tests.kit.dkimkeys import Signer, message
from tests.kit.dnsserver import DnsServer

from ..conftest import config_text

RSA = Signer("good.test", "sel")
ED = Signer("good.test", "ed", kind="ed25519")
OTHER = Signer("other.test", "s1")


def publish(server: DnsServer) -> None:
    server.zone(
        "good.test",
        {
            RSA.name: {"TXT": RSA.record},
            ED.name: {"TXT": ED.record},
            "revoked._domainkey": {"TXT": "v=DKIM1; k=rsa; p="},
            "broken._domainkey": {"TXT": "v=DKIM1; k=rsa; p=bm90IGEga2V5"},
            "temp._domainkey": {"TXT": RSA.record},
            "nostrings._domainkey": {"TXT": r"\# 0"},  # a TXT record of no strings
        },
    )
    server.zone("other.test", {OTHER.name: {"TXT": OTHER.record}})
    server.fail("temp._domainkey.good.test")


class Checker:
    """The end-of-data pipeline of one configuration, run on a message."""

    def __init__(self, services: Services, policy: Policy) -> None:
        self.services = services
        self.pipeline = policy.pipeline

    async def __call__(self, msg: bytes | Message, relay: bool = False) -> DkimResults | None:
        client = Client(ipaddress.ip_address("127.0.0.2"), 4000, helo="mx.good.test")
        session = Session("t1", client, relay_permitted=relay)
        txn = Transaction("alice@good.test")
        session.transaction = txn
        m = msg if isinstance(msg, Message) else Message(msg)
        await self.pipeline.run(CheckContext(Stage.EOD, session, txn, message=m), Ledger({}))
        return txn.results.get(DkimResults)


@pytest.fixture
async def make(dns_server: DnsServer) -> AsyncIterator:
    publish(dns_server)
    built: list[Services] = []

    async def build(settings: str = "") -> Checker:
        config = loads(config_text(None, f"[dkim]\nenabled = true\n{settings}", dns=dns_server))
        services = Services.build(config)
        built.append(services)
        return Checker(services, build_policy(config, services))

    yield build
    for services in built:
        await services.aclose()


def results(found: DkimResults | None) -> list[tuple[str, str]]:
    assert found is not None
    return [(s.result, s.reason) for s in found.signatures]


async def test_a_good_signature_passes(make) -> None:
    check = await make()
    signed = RSA.sign(message())
    found = await check(signed)
    assert found is not None and len(found.signatures) == 1
    sig = found.signatures[0]
    assert (sig.result, sig.domain, sig.selector) == ("pass", "good.test", "sel")
    assert (sig.identity, sig.algorithm) == ("@good.test", "rsa-sha256")
    b = signed.split(b" b=", 1)[1].replace(b"\r\n", b"").replace(b" ", b"")
    assert sig.b == b[:8].decode()
    assert found.passed == ["good.test"]


async def test_ed25519_passes(make) -> None:
    check = await make()
    found = await check(ED.sign(message(), identity="alice@good.test"))
    sig = found.signatures[0]
    assert (sig.result, sig.algorithm, sig.identity) == (
        "pass",
        "ed25519-sha256",
        "alice@good.test",
    )


async def test_a_tampered_body_fails(make) -> None:
    check = await make()
    signed = RSA.sign(message(body=b"Pay 10 euros\r\n"))
    found = await check(signed.replace(b"Pay 10", b"Pay 99"))
    assert results(found) == [("fail", "body hash did not verify")]
    # relaxed body canonicalisation: whitespace changes are not tampering
    assert results(await check(signed.replace(b"Pay 10", b"Pay  10"))) == [("pass", "")]


async def test_a_tampered_signed_header_fails(make) -> None:
    check = await make()
    signed = RSA.sign(message(subject="invoice"))
    found = await check(signed.replace(b"Subject: invoice", b"Subject: INVOICE now"))
    assert results(found) == [("fail", "signature did not verify")]
    # a header that is not signed may change
    assert results(await check(b"X-Not-Signed: yes\r\n" + signed)) == [("pass", "")]


async def test_every_signature_is_verified(make) -> None:
    check = await make()
    first = RSA.sign(message(body=b"original\r\n"))
    # a second signature over the same message, then the body changed by a list
    # that re-signs it with its own domain: the first one now fails
    relayed = OTHER.sign(first.replace(b"original", b"original\r\n-- \r\nlist footer"))
    found = await check(relayed)
    assert [(s.domain, s.result) for s in found.signatures] == [
        ("other.test", "pass"),
        ("good.test", "fail"),
    ]
    assert found.passed == ["other.test"]
    both = ED.sign(RSA.sign(message()))
    assert [(s.selector, s.result) for s in (await check(both)).signatures] == [
        ("ed", "pass"),
        ("sel", "pass"),
    ]


async def test_key_problems(make, dns_server: DnsServer) -> None:
    check = await make()
    missing = Signer("good.test", "nokey")
    assert results(await check(missing.sign(message()))) == [("permerror", "no key for signature")]
    revoked = Signer("good.test", "revoked")
    assert results(await check(revoked.sign(message()))) == [("permerror", "key revoked")]
    broken = Signer("good.test", "broken")
    [(kind, reason)] = results(await check(broken.sign(message())))
    assert kind == "permerror" and reason.startswith("bad key")
    nodomain = Signer("nowhere.test", "sel")
    assert results(await check(nodomain.sign(message()))) == [("permerror", "no key for signature")]
    temp = Signer("good.test", "temp")
    [(kind, reason)] = results(await check(temp.sign(message())))
    assert kind == "temperror" and reason.startswith("key lookup failed")
    # an empty record is an answer (no key in it), not a lookup that times out
    empty = Signer("good.test", "nostrings")
    [(kind, reason)] = results(await check(empty.sign(message())))
    assert kind == "permerror" and reason.startswith("bad key"), reason


async def test_signatures_we_do_not_accept(make) -> None:
    check = await make("min_key_bits = 3072\n")
    assert results(await check(RSA.sign(message()))) == [("policy", "public key too small: 2048")]
    check = await make()
    sha1 = RSA.sign(message(), algorithm=b"rsa-sha1")
    assert results(await check(sha1)) == [("policy", "rsa-sha1 is not accepted (RFC 8301)")]
    bad = RSA.sign(message()).replace(b"v=1;", b"v=2;", 1)
    [(kind, reason)] = results(await check(bad))
    assert kind == "neutral" and "v=" in reason


async def test_key_record_restrictions(make, dns_server: DnsServer) -> None:
    # RFC 6376 §3.6.1: h= lists the hash algorithms the key may be used with, and
    # t=s forbids an i= in a subdomain of d=; dkimpy honours neither.
    key = RSA.record
    dns_server.zone(
        "good.test",
        {
            RSA.name: {"TXT": key},
            "sha1only._domainkey": {"TXT": f"{key}; h=sha1"},
            "both._domainkey": {"TXT": f"{key}; h=sha1:sha256"},
            "future._domainkey": {"TXT": f"{key}; h=sha512:SHA256"},  # unknown ones ignored
            "strict._domainkey": {"TXT": f"{key}; t=s"},
            "teststrict._domainkey": {"TXT": f"{key}; t=y:s"},
        },
    )
    check = await make()

    async def result(selector: str, identity: str | None = None) -> tuple[str, str]:
        signer = Signer("good.test", selector)
        [found] = results(await check(signer.sign(message(), identity=identity)))
        return found

    assert await result("sha1only") == ("permerror", "key h= does not allow sha256")
    assert await result("both") == ("pass", "")
    assert await result("future") == ("pass", "")
    # ...and rsa-sha1 stays unacceptable whatever the key allows (RFC 8301)
    sha1 = Signer("good.test", "sha1only").sign(message(), algorithm=b"rsa-sha1")
    assert results(await check(sha1)) == [("policy", "rsa-sha1 is not accepted (RFC 8301)")]
    for selector in ("strict", "teststrict"):
        assert await result(selector, "alice@good.test") == ("pass", "")
        assert await result(selector) == ("pass", "")  # no i=: it is @d=
        assert await result(selector, "alice@news.good.test") == (
            "permerror",
            "key t=s: the i= domain must be the d= domain",
        )
    assert await result("sel", "alice@news.good.test") == ("pass", "")  # no t=s: allowed


async def test_no_signature_and_our_own_clients(make) -> None:
    check = await make()
    before = metrics.REGISTRY.get_sample_value(
        "spamgate_auth_results_total", {"method": "dkim", "result": "none"}
    )
    assert (await check(message())).signatures == ()
    after = metrics.REGISTRY.get_sample_value(
        "spamgate_auth_results_total", {"method": "dkim", "result": "none"}
    )
    assert after == (before or 0) + 1
    assert await check(RSA.sign(message()), relay=True) is None  # mynetworks: not verified


async def test_keys_come_from_the_shared_cache(make, dns_server: DnsServer) -> None:
    check = await make()
    await check(RSA.sign(message()))
    await check(ED.sign(RSA.sign(message(subject="again"))))
    assert dns_server.count("sel._domainkey.good.test", "TXT") == 1
    assert dns_server.count("ed._domainkey.good.test", "TXT") == 1


async def test_only_the_first_signatures_are_verified(make, dns_server: DnsServer) -> None:
    check = await make("max_signatures = 2\n")
    three = OTHER.sign(ED.sign(RSA.sign(message())))
    found = await check(three)
    assert [s.domain for s in found.signatures] == ["other.test", "good.test"]
    assert dns_server.count("sel._domainkey.good.test") == 0  # the third: not even looked up


async def test_a_slow_key_lookup_is_bounded(make, dns_server: DnsServer) -> None:
    dns_server.delays["sel._domainkey.good.test"] = 3.0
    check = await make("timeout = 0.4\n")
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert results(await check(RSA.sign(message()))) == [
        ("temperror", "verification took more than 0.4s")
    ]
    assert loop.time() - started < 1.0


async def test_a_large_message_is_verified_in_a_worker_process(make, monkeypatch, tmp_path) -> None:
    # Verification in this process would fail: so a pass proves another process did it.
    def here(*args, **kwargs):
        raise AssertionError("verified in the spamgate process")

    monkeypatch.setattr(spamgate.checks.dkim, "verify", here)
    monkeypatch.setattr(dkimverify, "verify", here)
    check = await make("inline_size = 1024\n")
    big = message(body=b"".join(b"line %d of a long message\r\n" % i for i in range(40000)))
    signed = ED.sign(RSA.sign(big))
    # in memory, handed over as bytes
    assert results(await check(signed)) == [("pass", ""), ("pass", "")]
    # spooled: handed over as a file name; this process never reads the body
    spool = Spool(threshold=4096, directory=str(tmp_path))
    await spool.write(signed.replace(b"line 7 of", b"line 8 of"))
    spooled = await spool.finish()
    assert spooled.path is not None
    found = await check(spooled)
    assert results(found) == [
        ("fail", "body hash did not verify"),
        ("fail", "body hash did not verify"),
    ]
    spooled.close()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b" ", b"\t", b"a", b"\r\n", b"  ", b"\t "])).map(b"".join))
def test_our_whitespace_compression_is_dkimpys(content: bytes) -> None:
    # dkimpy's own, which dkimverify replaces (it matches every single space)
    assert dkimverify.compress_whitespace(content) == re.sub(b"[\t ]+", b" ", content)
    assert dkim.canonicalization.compress_whitespace is dkimverify.compress_whitespace


async def test_a_dead_worker_process_is_replaced(dns_server: DnsServer) -> None:
    publish(dns_server)
    dns_server.zone(
        "good.test",
        {RSA.name: {"TXT": RSA.record}, "_dmarc": {"TXT": "v=DMARC1; p=reject"}},
    )
    config = loads(
        config_text(
            None,
            "[spf]\nenabled = true\n[dkim]\nenabled = true\ninline_size = 0\n"
            "[dmarc]\nenabled = true\n",
            dns=dns_server,
        )
    )
    services = Services.build(config)
    pipeline = build_policy(config, services).pipeline
    small = RSA.sign(message())
    big = RSA.sign(message(body=b"".join(b"line %d\r\n" % i for i in range(600000))))

    async def run(signed: bytes) -> tuple[Transaction, object]:
        client = Client(ipaddress.ip_address("127.0.0.2"), 4000, helo="mx.other.test")
        session = Session("t1", client)
        txn = Transaction("bounce@other.test")  # SPF does not align: DMARC rests on DKIM
        session.transaction = txn
        outcome = await pipeline.run(
            CheckContext(Stage.EOD, session, txn, message=Message(signed)), Ledger({})
        )
        return txn, outcome

    try:
        txn, _ = await run(small)
        assert [s.result for s in txn.results.get(DkimResults).signatures] == ["pass"]
        pool = services._processes
        assert pool is not None
        # the worker dies in the middle of verifying a large message
        task = asyncio.ensure_future(run(big))
        await asyncio.sleep(0.15)
        for pid in list(pool._processes):  # the workers, not the forkserver
            os.kill(pid, signal.SIGKILL)
        before = metrics.REGISTRY.get_sample_value(
            "spamgate_dmarc_internal_errors_total", {"cause": "dkim"}
        )
        txn, outcome = await task
        # no DKIM result: DMARC cannot tell whether it would have passed, and it is
        # spamgate's failure, not the signer's: p=reject is neither applied nor
        # forgotten, the sender is asked to try again
        assert txn.results.get(DkimResults) is None
        assert ("dkim", "exception") in txn.results.get(CheckFailures).failed
        dmarc = txn.results.get(DmarcResults)
        assert dmarc.result == "temperror" and dmarc.results[0].internal == "dkim"
        assert outcome.final is not None and outcome.final.action is Action.DEFER
        assert (outcome.final.reply.code, outcome.final.reply.enhanced) == (451, "4.3.0")
        assert (
            metrics.REGISTRY.get_sample_value(
                "spamgate_dmarc_internal_errors_total", {"cause": "dkim"}
            )
            == before + 1
        )
        txn, _ = await run(small)  # on a new pool
        assert [s.result for s in txn.results.get(DkimResults).signatures] == ["pass"]
        assert services._processes is not pool
    finally:
        await services.aclose()
