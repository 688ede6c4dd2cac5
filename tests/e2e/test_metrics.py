"""The metrics catalogue, the /metrics, /healthz and /readyz endpoint, and what is counted.

Counters live in one process-wide registry shared by every test in this process, so
these tests compare values before and after the traffic they send. The absolute
counts, as Prometheus sees them, are checked in test_prometheus.py against a fresh
spamgate process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spamgate import metrics
from spamgate.app import build, loads
from spamgate.ops import health
from spamgate.ops.server import StartupError
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import GateFactory, need_binary
from . import scripted

ROOT = pathlib.Path(__file__).resolve().parents[2]
METRICS = '[metrics]\nlisten = "127.0.0.1:0"\n'
BODY = b"Subject: hello\r\nFrom: a@example.org\r\n\r\nHi\r\n"

# Label names a metric may carry: closed sets only. Client addresses, mail
# addresses, domains and HELO names must never become labels.
CLOSED_LABELS = {
    "frontend",  # proxy, milter
    "symbol",  # rspamd / SpamAssassin names listed in the config (count_symbols)
    "stage",
    "check",
    "action",
    "outcome",
    "result",
    "zone",
    "table",
    "rule",
    "command",
    "kind",
    "reason",
    "method",
    "type",
    "hash",
    "op",
    "le",
    "cause",  # spf, dkim, dmarc
    "nameserver",  # [dns] nameservers (or resolv.conf's): configured, like zones
}
BUILD_LABELS = {"version", "python", "aiosmtpd", "aiosmtplib", "dnspython", "pyspf", "dkimpy"}


def value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Counts:
    """Sample values at creation; `delta()` gives the change since."""

    def __init__(self) -> None:
        self.before = self._all()

    @staticmethod
    def _all() -> dict[tuple[str, tuple], float]:
        out = {}
        for family in metrics.REGISTRY.collect():
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def delta(self, name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return self._all().get(key, 0.0) - self.before.get(key, 0.0)

    def verdicts(self, stage: str, check: str, action: str = "reject") -> float:
        return self.delta("spamgate_verdicts_total", stage=stage, check=check, action=action)

    def would(self, stage: str, check: str, action: str = "reject") -> float:
        return self.delta(
            "spamgate_monitor_verdicts_total", stage=stage, check=check, action=action
        )


@pytest.fixture
def checks(tmp_path, dns_server) -> Iterator[str]:
    """Rule tables written, DNS zones and keys published; yields the config sections
    that use them (gates that run them are started with `checks=scripted.CHECKS`)."""
    scripted.publish_dns(dns_server)
    yield scripted.write_rules(tmp_path) + scripted.DNS_CHECKS


OUTSIDE = "127.0.0.20"  # a client outside mynetworks: DNS lists and SPF apply


def fetch(url: str, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body), without raising on 4xx/5xx."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


# HTTP clients get threads of their own: the event loop's default executor also
# resolves host names for the upstream probe, and must not be filled with clients
# waiting for that probe.
_CLIENTS = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="http-client")


async def aget(url: str, method: str = "GET") -> tuple[int, str, str]:
    return await asyncio.get_running_loop().run_in_executor(_CLIENTS, fetch, url, method)


def base_url(gate) -> str:
    assert gate.server.exporter is not None
    host, port = gate.server.exporter.address
    return f"http://{host}:{port}"


async def send(gate, sender: str, rcpts: list[str], body: bytes = BODY, **kw) -> list:
    c, _ = await gate.client(**kw)
    replies = await c.mail(sender, rcpts, body)
    await c.cmd("QUIT")
    await c.close()
    return replies


# -- the catalogue ---------------------------------------------------------------------


def test_catalogue_names_units_and_labels() -> None:
    families = [f for f in metrics.REGISTRY.collect() if f.name.startswith("spamgate_")]
    assert len(families) >= 25
    for f in families:
        assert f.documentation, f.name
        assert f.type in ("counter", "gauge", "histogram"), f.name
        if f.type == "histogram":
            scores = ("spamgate_score", "spamgate_scanner_score")
            assert f.name.endswith(("_seconds", "_bytes")) or f.name in scores, f.name
        if f.type == "gauge":
            assert not f.name.endswith("_total"), f.name
        labels = {k for s in f.samples for k in s.labels}
        allowed = CLOSED_LABELS | (BUILD_LABELS if f.name == "spamgate_build_info" else set())
        assert labels <= allowed, (f.name, labels - allowed)
    names = {f.name for f in families}
    for required in (
        "spamgate_sessions",
        "spamgate_sessions_active",
        "spamgate_transactions",
        "spamgate_verdicts",
        "spamgate_monitor_verdicts",
        "spamgate_rule_hits",
        "spamgate_score",
        "spamgate_dns_queries",
        "spamgate_dns_query_duration_seconds",
        "spamgate_dnsbl_results",
        "spamgate_auth_results",
        "spamgate_upstream_duration_seconds",
        "spamgate_upstream_errors",
        "spamgate_message_size_bytes",
        "spamgate_config_reloads",
        "spamgate_config_last_reload_timestamp_seconds",
        "spamgate_config_last_reload_success",
        "spamgate_config_info",
        "spamgate_build_info",
    ):
        assert required in names, required


def test_metrics_are_defined_in_one_module() -> None:
    # Any module importing prometheus_client's metric types could define its own.
    kinds = r"(Counter|Gauge|Histogram|Summary|Info|Enum)"
    pattern = re.compile(
        rf"(from prometheus_client(\.metrics)? import [^\n]*\b{kinds}\b)"
        rf"|prometheus_client\.{kinds}\("
    )
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "spamgate").rglob("*.py")
        if path.name != "metrics.py" and pattern.search(path.read_text())
    ]
    assert offenders == []


async def test_known_series_exist_before_any_traffic() -> None:
    """Series known in advance exist at zero: the fixed ones from the start, the
    core's decisions (relay control, limits, scores) once a configuration loads."""
    app = build(loads('[server]\nhostname = "gate.test"\n'))
    try:
        text = _render(metrics.REGISTRY)
    finally:
        await app.aclose()
    for outcome in metrics.TRANSACTION_OUTCOMES:
        assert f'spamgate_transactions_total{{frontend="proxy",outcome="{outcome}"}}' in text
    for method, results in metrics.AUTH_RESULT_SETS.items():
        for result in results:
            assert f'spamgate_auth_results_total{{method="{method}",result="{result}"}}' in text
    assert 'spamgate_verdicts_total{action="reject",check="relay",stage="rcpt"}' in text
    assert 'spamgate_upstream_errors_total{kind="connect"}' in text
    assert re.search(r'spamgate_build_info\{.*version="[^"]+".*\} 1\.0', text)


def _render(registry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


# -- the endpoint ---------------------------------------------------------------------


async def test_endpoint_serves_metrics_health_and_readiness(gate_factory: GateFactory) -> None:
    gate = await gate_factory(METRICS)
    url = base_url(gate)
    status, ctype, body = await aget(url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert "spamgate_sessions" in families and "spamgate_config_info" in families
    status, _, body = await aget(url + "/healthz")
    assert (status, body) == (200, "ok\nalive\n")
    status, _, body = await aget(url + "/readyz")
    assert status == 200, body
    assert f"listening: {gate.host}:{gate.port}" in body
    assert "upstream: 127.0.0.1:" in body and "answers" in body
    assert (await aget(url + "/nothing"))[0] == 404
    assert (await aget(url + "/healthz", "POST"))[0] == 405


async def test_metrics_port_in_use_stops_startup(gate_factory: GateFactory) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        with pytest.raises(StartupError, match=f"127.0.0.1:{port} for metrics"):
            await gate_factory(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    finally:
        busy.close()


async def test_readyz_probe_is_cached_and_shared(gate_factory: GateFactory, sink: Sink) -> None:
    gate = await gate_factory(METRICS + "probe_interval = 1\n")
    url = base_url(gate) + "/readyz"
    before = sink.connections
    results = await asyncio.gather(*(aget(url) for _ in range(20)))
    assert {r[0] for r in results} == {200}, results[0]
    assert sink.connections - before == 1  # twenty requests, one connection to the MTA
    assert value("spamgate_upstream_up") == 1
    await sink.stop()
    assert (await aget(url))[0] == 200  # the cached answer, still fresh
    await asyncio.sleep(1.1)
    status, _, body = await aget(url)
    assert status == 503
    assert "does not answer" in body
    assert value("spamgate_upstream_up") == 0


async def test_readyz_fails_while_shutting_down(gate_factory: GateFactory) -> None:
    gate = await gate_factory(METRICS)
    url = base_url(gate) + "/readyz"
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")  # a transaction keeps the session open
    stopping = asyncio.create_task(gate.server.stop(grace=5))
    await asyncio.sleep(0.1)
    status, _, body = await aget(url)
    assert status == 503 and "shutting down" in body
    assert (await aget(base_url(gate) + "/healthz"))[0] == 200
    await c.cmd("RSET")
    await stopping


async def test_healthz_notices_a_blocked_event_loop(
    gate_factory: GateFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "LOOP_TIMEOUT", 0.2)
    gate = await gate_factory(METRICS)
    url = base_url(gate) + "/healthz"
    answer: list = []
    t = threading.Thread(target=lambda: answer.append(fetch(url)))
    t.start()
    time.sleep(0.8)  # deliberately block the event loop
    await asyncio.to_thread(t.join)
    status, _, body = answer[0]
    assert status == 503 and "did not respond" in body
    assert (await aget(url))[0] == 200


async def test_scrapes_and_idle_http_clients_do_not_stall_smtp(
    gate_factory: GateFactory, sink: Sink
) -> None:
    gate = await gate_factory(METRICS)
    host, port = gate.server.exporter.address  # type: ignore[union-attr]
    idle = []
    for _ in range(20):  # connect and send half a request, then nothing
        s = socket.create_connection((host, port))
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        idle.append(s)
    stop = threading.Event()
    scrapes = []

    def storm() -> None:
        while not stop.is_set():
            scrapes.append(fetch(f"http://{host}:{port}/metrics")[0])

    threads = [threading.Thread(target=storm) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        slowest = 0.0
        c, _ = await gate.client()
        await c.cmd("EHLO c.test")
        for i in range(10):
            for line in (f"MAIL FROM:<s{i}@example.org>", "RCPT TO:<u@example.test>", "DATA"):
                started = time.monotonic()
                r = await c.cmd(line)
                slowest = max(slowest, time.monotonic() - started)
            assert r.code == 354
            await c.send(BODY + b".\r\n")
            assert (await c.reply()).code == 250
    finally:
        stop.set()
        for t in threads:
            await asyncio.to_thread(t.join)
        for s in idle:
            s.close()
    assert len(sink.messages) == 10
    assert scrapes and set(scrapes) == {200}
    # Generous: a scrape rendered on the event loop, or a server waiting for the
    # idle clients' requests, would hold every reply far longer than this.
    assert slowest < 1.0, slowest


# -- what is counted ---------------------------------------------------------------------


async def test_relay_denial_is_a_rejection_at_rcpt(gate_factory: GateFactory) -> None:
    gate = await gate_factory()
    counts = Counts()
    replies = await send(gate, "a@example.org", ["x@elsewhere.test"], source="127.0.0.5")
    assert replies[2].code == 554
    assert counts.verdicts("rcpt", "relay") == 1
    assert counts.delta("spamgate_recipients_total", outcome="relay_denied") == 1
    assert counts.delta("spamgate_transactions_total", frontend="proxy", outcome="rejected") == 1
    assert counts.delta("spamgate_sessions_total", frontend="proxy") == 1


async def test_size_limits_are_rejections(gate_factory: GateFactory) -> None:
    gate = await gate_factory("[limits]\nmessage_size = 2000\n")
    counts = Counts()
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    assert (await c.cmd("MAIL FROM:<a@example.org> SIZE=5000")).code == 552
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
    assert (await c.cmd("DATA")).code == 354
    await c.send(BODY + b"x" * 3000 + b"\r\n.\r\n")
    assert (await c.reply()).code == 552
    await c.close()
    assert counts.verdicts("mail", "limits") == 1
    assert counts.verdicts("eod", "limits") == 1
    assert counts.delta("spamgate_transactions_total", frontend="proxy", outcome="rejected") == 1
    assert counts.delta("spamgate_protocol_errors_total", kind="message_too_big") == 2


async def test_transaction_outcomes(gate_factory: GateFactory, sink: Sink, checks: str) -> None:
    sink.behaviour.refuse_local = "nobody"
    gate = await gate_factory(checks, checks=scripted.CHECKS)
    counts = Counts()
    assert (await send(gate, "a@example.org", ["u@example.test"]))[-1].code == 250
    assert (await send(gate, "a@example.org", ["discard@example.test"]))[-1].code == 250
    assert (await send(gate, "a@example.org", ["defer@example.test"]))[2].code == 450
    assert (await send(gate, "a@example.org", ["nobody@example.test"]))[2].code == 550
    c, _ = await gate.client()
    await c.cmd("EHLO c.test")
    await c.cmd("MAIL FROM:<a@example.org>")
    await c.cmd("RCPT TO:<u@example.test>")
    await c.cmd("RSET")
    await c.close()
    for outcome, n in (
        ("accepted", 1),
        ("discarded", 1),
        ("tempfailed", 1),
        ("upstream_rejected", 1),
        ("aborted", 1),
        ("rejected", 0),
    ):
        got = counts.delta("spamgate_transactions_total", frontend="proxy", outcome=outcome)
        assert got == n, outcome
    assert counts.verdicts("rcpt", "recipient", "discard") == 1
    assert counts.verdicts("rcpt", "recipient", "defer") == 1
    assert counts.delta("spamgate_message_size_bytes_count") == 2
    assert counts.delta("spamgate_message_size_bytes_sum") == 2 * len(BODY)
    up = counts.delta("spamgate_upstream_duration_seconds_count", command="rcpt")
    assert up >= 3  # accepted, discard's upstream RCPT, nobody


async def test_verdicts_rules_and_results(gate_factory: GateFactory, checks: str) -> None:
    gate = await gate_factory(checks, checks=scripted.CHECKS)
    counts = Counts()

    async def mail(sender: str, rcpts: list[str], body: bytes = BODY, source: str = OUTSIDE):
        return [r.code for r in (await send(gate, sender, rcpts, body, source=source))[2:]]

    assert await mail("a@spf-pass.test", ["reject@example.test", "u@example.test"]) == [
        550,
        250,
        354,
        250,
    ]
    assert (await mail("reject-mail@spf-fail.test", ["u@example.test"]))[0] == 554  # sender table
    assert (await mail("x@spf-fail.test", ["u@example.test"]))[0] == 550  # SPF fail
    assert (await mail("a@example.org", ["u@example.test"], source="127.0.0.2"))[0] == 554
    assert (await mail("a@example.org", ["u@example.test"], source="127.0.0.9"))[0] == 554
    assert (await mail("reject-data@example.org", ["u@example.test"]))[1] == 554
    body = b"Subject: reject-eod\r\nFrom: a@example.org\r\n\r\nx\r\n"
    assert (await mail("a@example.org", ["u@example.test"], body))[-1] == 550
    body = scripted.signed_then_changed(
        b"Subject: hi\r\nFrom: a@dmarc-none.test\r\nTo: <u@example.test>\r\n\r\nx\r\n"
    )
    assert (await mail("a@example.org", ["u@example.test"], body))[-1] == 250

    assert counts.verdicts("connect", "client.cidr") == 1
    assert counts.verdicts("connect", "dnsbl") == 1
    assert counts.verdicts("mail", "sender") == 1
    assert counts.verdicts("mail", "spf") == 1
    assert counts.verdicts("rcpt", "recipient") == 1
    assert counts.verdicts("data", "scripted") == 1
    assert counts.verdicts("eod", "header.regexp") == 1
    for table, text in (
        ("recipient", "reject@"),
        ("sender", "reject-mail@"),
        ("client.cidr", "127.0.0.9"),
        ("header.regexp", "reject-eod"),
    ):
        hit = scripted.rule(table, text)
        assert counts.delta("spamgate_rule_hits_total", table=hit[0], rule=hit[1]) == 1, hit

    def auth(method: str, result: str) -> float:
        return counts.delta("spamgate_auth_results_total", method=method, result=result)

    # SPF ran for every MAIL FROM the sender table let through, from clients not
    # already refused: spf-pass, spf-fail, and four with no SPF record.
    assert (auth("spf", "pass"), auth("spf", "fail"), auth("spf", "none")) == (1, 1, 3)
    assert auth("dkim", "fail") == 1 and auth("dmarc", "fail") == 1

    def dnsbl(zone: str, result: str) -> float:
        return counts.delta("spamgate_dnsbl_results_total", zone=zone, result=result)

    assert dnsbl("zen.bl.test", "listed") == 1 and dnsbl("bad.bl.test", "listed") == 1
    # every session but 127.0.0.2 (listed) and 127.0.0.9 (refused by client.cidr first)
    assert dnsbl("zen.bl.test", "not_listed") == 6
    assert counts.delta("spamgate_dns_query_duration_seconds_count", type="A") >= 2
    # the recipient table ran for every RCPT not already refused: 2 + 1 + 1 + 1
    assert counts.delta("spamgate_check_duration_seconds_count", check="recipient") == 5


async def test_monitor_mode_counts_what_would_have_happened(
    gate_factory: GateFactory, sink: Sink, checks: str
) -> None:
    gate = await gate_factory(checks, server={"mode": '"monitor"'}, checks=scripted.CHECKS)
    counts = Counts()
    replies = await send(gate, "a@spf-fail.test", ["reject@example.test"], source="127.0.0.2")
    assert replies[-1].code == 250
    assert len(sink.messages) == 1
    assert counts.would("rcpt", "recipient") == 1
    assert counts.would("connect", "dnsbl") == 1
    assert counts.would("mail", "spf") == 1
    assert counts.verdicts("rcpt", "recipient") == 0
    assert counts.delta("spamgate_transactions_total", frontend="proxy", outcome="accepted") == 1
    # WARN in enforce mode is counted the same way, and relay control is never "would"
    gate2 = await gate_factory(checks, checks=scripted.CHECKS)
    counts = Counts()
    assert (await send(gate2, "a@example.org", ["warn@example.test"]))[-1].code == 250
    replies = await send(gate2, "a@example.org", ["x@elsewhere.test"], source="127.0.0.5")
    assert replies[2].code == 554
    assert counts.would("rcpt", "recipient") == 1
    hit = scripted.rule("recipient", "warn@")
    assert counts.delta("spamgate_rule_hits_total", table=hit[0], rule=hit[1]) == 1
    assert counts.verdicts("rcpt", "relay") == 1


async def test_score_observed_and_check_errors_counted(
    gate_factory: GateFactory, checks: str
) -> None:
    gate = await gate_factory(checks + "\n[scoring]\nreject = 10\n", checks=scripted.CHECKS)
    counts = Counts()
    body = b"Subject: big score\r\nFrom: a@example.org\r\n\r\nx\r\n"
    assert (await send(gate, "a@example.org", ["u@example.test"], body))[-1].code == 550
    assert (await send(gate, "a@example.org", ["boom@example.test"]))[-1].code == 250
    assert counts.verdicts("eod", "score") == 1
    assert counts.delta("spamgate_score_count") == 2
    assert counts.delta("spamgate_score_bucket", le="10.0") == 1  # the 0-score message
    assert counts.delta("spamgate_check_errors_total", check="scripted", kind="exception") == 1


async def test_reloads_publish_config_hash_and_result(gate_factory: GateFactory, tmp_path) -> None:
    gate = await gate_factory(METRICS)
    server = gate.server
    path = server.config.path
    assert path is not None
    old = server.runtime.policy.digest
    assert value("spamgate_config_info", hash=old) == 1
    counts = Counts()
    text = pathlib.Path(path).read_text()
    pathlib.Path(path).write_text(text + "\n# changed\n")
    before = time.time()
    assert await server.reload(path)
    new = server.runtime.policy.digest
    assert new != old
    assert value("spamgate_config_info", hash=new) == 1
    assert metrics.REGISTRY.get_sample_value("spamgate_config_info", {"hash": old}) is None
    assert value("spamgate_config_last_reload_timestamp_seconds") >= before
    assert counts.delta("spamgate_config_reloads_total", result="success") == 1
    assert value("spamgate_config_last_reload_success") == 1
    pathlib.Path(path).write_text(text + "\n[limits]\nrecipients = -1\n")
    assert not await server.reload(path)
    assert counts.delta("spamgate_config_reloads_total", result="failure") == 1
    assert value("spamgate_config_last_reload_success") == 0
    assert value("spamgate_config_info", hash=new) == 1  # the previous config still runs
    status, _, body = await aget(base_url(gate) + "/readyz")
    assert status == 200 and "reload was refused" in body
    pathlib.Path(path).write_text(text)
    assert await server.reload(path)
    assert value("spamgate_config_last_reload_success") == 1


async def test_promtool_accepts_a_real_scrape(gate_factory: GateFactory, checks: str) -> None:
    need_binary("/usr/bin/promtool", "promtool (Debian package prometheus)")
    gate = await gate_factory(checks + METRICS, checks=scripted.CHECKS)
    await send(gate, "a@spf-pass.test", ["reject@example.test", "u@example.test"])
    await send(gate, "a@example.org", ["u@example.test"], source="127.0.0.3")
    _, _, text = await aget(base_url(gate) + "/metrics")
    assert "spamgate_rule_hits_total{" in text
    out = subprocess.run(
        ["/usr/bin/promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


async def test_raw_client_can_pick_source(gate_factory: GateFactory) -> None:
    # The tests above rely on loopback aliases being usable as client addresses.
    gate = await gate_factory()
    c, banner = await RawClient.connect(gate.port, source="127.0.0.9")
    assert banner is not None and banner.code == 220
    await c.close()


async def test_dns_list_zones_exist_before_the_first_lookup(gate_factory: GateFactory) -> None:
    # A dashboard's "top DNS lists" must count a zone's first listing as an increase.
    await gate_factory(
        '[dnsbl]\nsites = ["zero.bl.test*2"]\n\n[rhsbl]\nsites = ["zero.dbl.test"]\n'
    )
    for zone in ("zero.bl.test", "zero.dbl.test"):
        for result in ("listed", "not_listed", "error"):
            labels = {"zone": zone, "result": result}
            assert metrics.REGISTRY.get_sample_value("spamgate_dnsbl_results_total", labels) == 0
