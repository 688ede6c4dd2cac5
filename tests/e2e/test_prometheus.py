"""The dashboard and the rule files, proven against a real Prometheus.

A fresh spamgate process (`python -m tests.e2e.scripted run`: the real CLI, with real
rule tables, real DNS list, SPF, DKIM and DMARC checks against the test DNS server
and messages signed by the test, the content checks against private clamd, spamd
and rspamd, plus the scripted check of tests/e2e/scripted.py for a failing check, a
refusal at DATA and a decision slower than the milter's deadline) is scraped every
second by a private Prometheus on loopback. It is both front ends at once: an SMTP
proxy, and the milter of a private Postfix. The test drives a scripted mix of
accepted, rejected (at connect, HELO, MAIL, RCPT, DATA and end of data),
tempfailed, discarded and monitor-mode traffic through the proxy, accepted and
refused mail (rules, links, attachments, a virus, GTUBE) through Postfix and the
milter, reloads into monitor mode and then into a broken configuration, and asks
Prometheus's HTTP API:

* every expression of grafana/dashboards/spamgate.json and every recording and
  alert rule returns data;
* the counts are the traffic sent (7 relay refusals at RCPT show as 7, each rule
  table line as often as it matched, ...);
* the alerts that a run can provoke fire: a refused reload, failing DNS, an
  unreachable upstream, a milter decision past its deadline, spamgate stopped.
  The refusal-rate alert, which compares with a day of history, is exercised by
  `promtool test rules`; here every series it reads must exist.

SPAMGATE_DASHBOARD_PNG=path redraws the picture of docs/monitoring.md from this
run (SPAMGATE_DASHBOARD_ROUNDS=N repeats the traffic mix N times, a few seconds
apart, for a picture with some history).
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from tests.kit.daemons import SIGNATURE, Clamd, Rspamd, Spamd
from tests.kit.dnsserver import DnsServer
from tests.kit.mimemaker import GTUBE, plain, with_attachment
from tests.kit.postfix import PostfixInstance, free_port
from tests.kit.sink import Sink
from tests.kit.smtpclient import RawClient

from ..conftest import PostfixFactory, config_text, need_binary
from . import scripted
from .plotscript import DASHBOARD, panels, substitute
from .scripted import LISTED, ZONES, write_rules

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
RULE_FILES = [
    ROOT / "grafana" / "prometheus" / "spamgate-recording.yml",
    ROOT / "grafana" / "prometheus" / "spamgate-alerts.yml",
]
RULE_TESTS = sorted((ROOT / "grafana" / "prometheus" / "tests").glob("*.yml"))
JOB = "spamgate"
# What Grafana would put in for its variables when the test evaluates a panel.
VARIABLES = {
    "job": JOB,
    "instance": ".+",
    "frontend": ".+",
    "__rate_interval": "1m",
    "__range": "10m",
}
# How each alert is shown to work in the live run (the rest by promtool unit tests).
LIVE_ALERTS = {
    "SpamgateReloadFailed": "a broken configuration is reloaded",
    "SpamgateDNSFailing": "the DNS server answers SERVFAIL",
    "SpamgateNameserverDown": "the DNS server stops answering",
    "SpamgateUpstreamFailing": "the upstream MTA is stopped",
    "SpamgateMilterFailing": "a check outlasts the milter's deadline",
    "SpamgateDown": "spamgate is stopped",
}
HISTORY_ALERTS = {
    "SpamgateRejectionRateUnusual": "needs a day of history (grafana/prometheus/tests/*.yml)",
    # provoked in tests/e2e/test_dmarc.py (a DKIM verification out of time); here its
    # series must exist, and promtool shows when it fires
    "SpamgateDMARCInternalErrors": "a failure inside spamgate (grafana/prometheus/tests/*.yml)",
}


# -- Prometheus -----------------------------------------------------------------------


class Prometheus:
    def __init__(self, port: int, proc: subprocess.Popen, log: pathlib.Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.proc = proc
        self.log = log

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=20) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{path} {params}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def values(self, expr: str, at: float | None = None) -> dict[tuple, float]:
        """{sorted label items: value} of an instant vector."""
        return {
            tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in self.query(expr, at)
        }

    async def ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await asyncio.to_thread(urllib.request.urlopen, f"{self.url}/-/ready", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text()
                    raise AssertionError("Prometheus did not start:\n" + log) from None
                await asyncio.sleep(0.1)

    async def wait_for(self, expr: str, timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = await asyncio.to_thread(self.query, expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"no data for {expr} after {timeout}s")
            await asyncio.sleep(0.25)


def start_prometheus(tmp: pathlib.Path, target: str) -> Prometheus:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(p) for p in RULE_FILES],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    return Prometheus(port, proc, log)


# -- spamgate as a process ---------------------------------------------------------------


class GateProcess:
    """`python -m tests.e2e.scripted run -c FILE`, its log read as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process, config: pathlib.Path) -> None:
        self.proc = proc
        self.config = config
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip())
            self._new.set()

    async def wait_log(self, pattern: str, timeout: float = 15) -> re.Match:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                m = re.search(pattern, line)
                if m:
                    return m
            seen = len(self.lines)
            self._new.clear()
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.returncode is not None:
                raise AssertionError(f"no log line /{pattern}/:\n" + "\n".join(self.lines))
            try:
                async with asyncio.timeout(left):
                    await self._new.wait()
            except TimeoutError:
                pass

    async def reload(self, text: str, expect: str) -> None:
        self.config.write_text(text)
        mark = len(self.lines)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any(expect in line for line in self.lines[mark:]):
            assert time.monotonic() < deadline, "\n".join(self.lines[mark:])
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self._reader
        assert self.proc.returncode is not None
        return self.proc.returncode


# -- the traffic, and what it should count ------------------------------------------------


@dataclass
class Tally:
    """What the traffic sent should show in each metric, by label values."""

    counts: dict[str, collections.Counter] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )

    def add(self, metric: str, *labels: str, n: int = 1) -> None:
        self.counts[metric][labels] += n

    def get(self, metric: str) -> collections.Counter:
        return self.counts[metric]


BODY = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello\r\n"
URIBL_ZONE = "uri.bl.test"


def content_checks(clamd: Clamd, spamd: Spamd, rspamd: Rspamd) -> str:
    """Every content check on; the scanners' scores weigh nothing, so the mail the
    other tallies count is decided as before."""
    return f"""
[uribl]
sites = ["{URIBL_ZONE}"]

[attachments]
enabled = true

[clamav]
address = "{clamd.address}"

[rspamd]
url = "http://{rspamd.address}"
weight = 0
count_symbols = ["GTUBE"]

[spamassassin]
address = "{spamd.address}"
weight = 0
count_symbols = ["GTUBE"]
"""


def milter_postfix(postfix_factory: PostfixFactory) -> tuple[PostfixInstance, int]:
    """A private Postfix whose milter is spamgate (on the port returned)."""
    port = free_port()
    postfix = postfix_factory(
        main_extra=[
            f"smtpd_milters = inet:127.0.0.1:{port}",
            "milter_default_action = tempfail",
        ]
    )
    return postfix, port


def body(subject: str = "hello", author: str = "a@example.org") -> bytes:
    return (
        f"From: {author}\r\nTo: <u@example.test>\r\nSubject: {subject}\r\n"
        "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nHello\r\n"
    ).encode()


CLIENT = "127.0.0.20"  # outside mynetworks (127.0.0.1/32): DNS lists and SPF apply
STRANGER = "127.0.0.5"  # tries to relay
HELO = "client.example.test"  # no SPF record: SPF for the HELO name is "none"


class Traffic:
    """The scripted mix. Each send asserts the replies and adds what it should count.

    Checks run in their registered order, the first final verdict of a stage ending
    it: a client refused by the client table gets no DNS list lookups, a session
    already refused (delayed rejection) no SPF checks, a sender refused by the
    sender table no SPF check of its own.
    """

    def __init__(self, port: int, tally: Tally) -> None:
        self.port = port
        self.t = tally
        self.monitor = False  # [server] mode = "monitor": refusals only counted

    def hit(self, table: str, text: str) -> None:
        self.t.add("rule", *scripted.rule(table, text))

    async def session(self, source: str = CLIENT, helo: str = HELO, port: int = 0):
        """Connect and EHLO (to spamgate, or to `port`: Postfix with spamgate as its
        milter); count the connect- and HELO-stage results."""
        c, banner = await RawClient.connect(port or self.port, source=source)
        assert banner is not None and banner.code == 220
        self.t.add("sessions")
        refused_at_connect = not self.monitor and (source == "127.0.0.9" or source in LISTED)
        if source != "127.0.0.9":  # client.cidr refuses it before the DNS lists
            for zone in ZONES:
                listed = zone in LISTED.get(source, ())
                self.t.add("dnsbl", zone, "listed" if listed else "not_listed")
        if not refused_at_connect and not helo.startswith("reject."):
            self.t.add("auth", "spf_helo", "none")
        assert (await c.cmd(f"EHLO {helo}")).code == 250
        return c

    async def mail(
        self,
        sender: str,
        rcpts: list[str],
        content: bytes = BODY,
        *,
        source: str = CLIENT,
        helo: str = HELO,
        spf: str | None = "none",
        auth: tuple[str, str] | None = ("none", "none"),
        port: int = 0,
    ) -> list[int]:
        """One session, one transaction, QUIT; the reply codes after EHLO.

        `auth`: the DKIM and DMARC results of a message that reaches their checks
        at the end of data (unsigned mail from a domain without DMARC: none, none);
        None when a check before them ends the stage."""
        c = await self.session(source, helo, port)
        codes = [(await c.cmd(f"MAIL FROM:<{sender}>")).code]
        codes += [(await c.cmd(f"RCPT TO:<{r}>")).code for r in rcpts]
        r = await c.cmd("DATA")
        codes.append(r.code)
        if r.code == 354:
            await c.send(content + b".\r\n")
            codes.append((await c.reply()).code)
            if auth:
                self.t.add("auth", "dkim", auth[0])
                self.t.add("auth", "dmarc", auth[1])
        await c.cmd("QUIT")
        await c.close()
        if spf:
            self.t.add("auth", "spf", spf)
        return codes

    async def enforce_mix(self) -> None:
        t = self.t
        for i in range(5):  # clean mail: SPF, DKIM and DMARC pass; of different sizes
            content = scripted.signed(
                body("small score", "a@spf-pass.test") + (b"x" * 76 + b"\r\n") * (40 * i)
            )
            codes = await self.mail(
                f"a{i}@spf-pass.test",
                ["u@example.test"],
                content,
                spf="pass",
                auth=("pass", "pass"),
            )
            assert codes == [250, 250, 354, 250]
            t.add("outcome", "accepted")
            self.hit("header.regexp", "small score")
            t.add("eod")
        for _ in range(2):  # mail that fails DKIM and DMARC (p=none), accepted all the same
            content = scripted.signed_then_changed(body("hi", "a@dmarc-none.test"))
            codes = await self.mail(
                "a@example.org", ["u@example.test"], content, auth=("fail", "fail")
            )
            assert codes == [250, 250, 354, 250]
            t.add("outcome", "accepted")
            t.add("eod")
        for _ in range(7):  # a stranger tries to relay
            codes = await self.mail("x@example.org", ["victim@elsewhere.test"], source=STRANGER)
            assert codes == [250, 554, 554]
            t.add("verdict", "rcpt", "relay", "reject")
            t.add("outcome", "rejected")
        for rcpt, code, action, outcome in (
            ("reject@example.test", 550, "reject", "rejected"),
            ("defer@example.test", 450, "defer", "tempfailed"),
        ):
            for _ in range(2):
                codes = await self.mail("a@example.org", [rcpt])
                assert codes == [250, code, 554]
                t.add("verdict", "rcpt", "recipient", action)
                self.hit("recipient", rcpt)
                t.add("outcome", outcome)
        # refused at MAIL by the sender table, then by SPF (told at RCPT: delayed rejection)
        codes = await self.mail("reject-mail@spf-fail.test", ["u@example.test"], spf=None)
        assert codes == [250, 554, 554]
        t.add("verdict", "mail", "sender", "reject")
        self.hit("sender", "reject-mail@")
        t.add("outcome", "rejected")
        codes = await self.mail("x@spf-fail.test", ["u@example.test"], spf="fail")
        assert codes == [250, 550, 554]
        t.add("verdict", "mail", "spf", "reject")
        t.add("outcome", "rejected")
        # refused at HELO (told at RCPT; MAIL-stage checks do not run)
        codes = await self.mail(
            "a@example.org", ["u@example.test"], helo="reject.bad.test", spf=None
        )
        assert codes == [250, 554, 554]
        t.add("verdict", "helo", "helo.regexp", "reject")
        self.hit("helo.regexp", "reject")
        t.add("outcome", "rejected")
        # refused at connect: by the client table, and by DNS lists (told at RCPT)
        codes = await self.mail("a@example.org", ["u@example.test"], source="127.0.0.9", spf=None)
        assert codes == [250, 554, 554]
        t.add("verdict", "connect", "client.cidr", "reject")
        self.hit("client.cidr", "127.0.0.9")
        t.add("outcome", "rejected")
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3"):
            codes = await self.mail("a@example.org", ["u@example.test"], source=source, spf=None)
            assert codes == [250, 554, 554]
            t.add("verdict", "connect", "dnsbl", "reject")
            t.add("outcome", "rejected")
        # refused at the DATA command
        codes = await self.mail("reject-data@example.org", ["u@example.test"])
        assert codes == [250, 250, 554]
        t.add("verdict", "data", "scripted", "reject")
        t.add("outcome", "rejected")
        # refused at the end of data: by a header rule, then by the score
        for _ in range(2):
            codes = await self.mail(
                "a@example.org", ["u@example.test"], body("reject-eod"), auth=None
            )
            assert codes == [250, 250, 354, 550]
            t.add("verdict", "eod", "header.regexp", "reject")
            self.hit("header.regexp", "reject-eod")
            t.add("outcome", "rejected")
            t.add("eod")
        codes = await self.mail("a@example.org", ["u@example.test"], body("big score"))
        assert codes == [250, 250, 354, 550]
        t.add("verdict", "eod", "score", "reject")
        self.hit("header.regexp", "big score")
        t.add("outcome", "rejected")
        t.add("eod")
        # size limits: declared at MAIL (no MAIL-stage checks), then actual content
        c = await self.session()
        assert (await c.cmd("MAIL FROM:<a@example.org> SIZE=50000")).code == 552
        await c.cmd("QUIT")
        await c.close()
        t.add("verdict", "mail", "limits", "reject")
        codes = await self.mail(
            "a@example.org", ["u@example.test"], BODY + b"x" * 25000 + b"\r\n", auth=None
        )
        assert codes == [250, 250, 354, 552]
        t.add("verdict", "eod", "limits", "reject")
        t.add("outcome", "rejected")
        # discarded; refused by the upstream; WARN (counted, not enforced); a failing check
        codes = await self.mail("a@example.org", ["discard@example.test"])
        assert codes == [250, 250, 354, 250]
        t.add("verdict", "rcpt", "recipient", "discard")
        self.hit("recipient", "discard@")
        t.add("outcome", "discarded")
        t.add("eod")
        codes = await self.mail("a@example.org", ["nobody@example.test"])
        assert codes == [250, 550, 554]
        t.add("outcome", "upstream_rejected")
        codes = await self.mail("a@example.org", ["warn@example.test"])
        assert codes == [250, 250, 354, 250]
        t.add("would", "rcpt", "recipient", "reject")
        self.hit("recipient", "warn@")
        t.add("outcome", "accepted")
        t.add("eod")
        codes = await self.mail("a@example.org", ["boom@example.test"])
        assert codes == [250, 250, 354, 250]
        t.add("check_error", "scripted", "exception")
        t.add("outcome", "accepted")
        t.add("eod")
        # abandoned with RSET
        c = await self.session()
        assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
        assert (await c.cmd("RCPT TO:<u@example.test>")).code == 250
        assert (await c.cmd("RSET")).code == 250
        await c.cmd("QUIT")
        await c.close()
        t.add("auth", "spf", "none")
        t.add("outcome", "aborted")

    async def milter_mix(self, port: int) -> None:
        """Through Postfix, with spamgate as its milter: the same checks decide, and
        the content checks have mail to judge."""
        t = self.t
        codes = await self.mail("a@example.org", ["u@example.test"], port=port)
        assert codes == [250, 250, 354, 250]
        t.add("outcome", "accepted")
        t.add("eod")
        # refused at RCPT in our words; Postfix refuses DATA without a recipient
        codes = await self.mail("a@example.org", ["reject@example.test"], port=port)
        assert codes == [250, 550, 554]
        t.add("verdict", "rcpt", "recipient", "reject")
        self.hit("recipient", "reject@")
        t.add("outcome", "rejected")
        # a decision past the milter's deadline: Postfix says 451, the session goes on
        codes = await self.mail("a@example.org", ["slow@example.test", "u@example.test"], port=port)
        assert codes == [250, 451, 250, 354, 250]
        t.add("outcome", "accepted")
        t.add("eod")
        t.add("milter_error", "deadline")
        # content checks: a link to a listed domain, an executable, a virus, GTUBE
        for content, check, code in (
            (plain("See http://listed-link.test/offer now", "link"), "uribl", 554),
            (with_attachment("invoice.exe", b"MZ\x90\x00" * 64), "attachments", 554),
            (plain(f"Sample {SIGNATURE} inside", "virus"), "clamav", 554),
            (plain(f"This is the GTUBE\n{GTUBE}\n", "gtube"), None, 250),
        ):
            codes = await self.mail("a@example.org", ["u@example.test"], content, port=port)
            assert codes == [250, 250, 354, code], (check, codes)
            if check is not None:
                t.add("verdict", "eod", check, "reject")
            t.add("outcome", "rejected" if check else "accepted")
            t.add("eod")
            if check == "uribl":
                t.add("dnsbl", URIBL_ZONE, "listed")

    async def monitor_mix(self) -> None:
        t = self.t
        self.monitor = True
        for _ in range(3):
            codes = await self.mail("a@example.org", ["reject@example.test"])
            assert codes == [250, 250, 354, 250]
            t.add("would", "rcpt", "recipient", "reject")
            self.hit("recipient", "reject@")
            t.add("outcome", "accepted")
            t.add("eod")
        # listed, and failing SPF: both only logged and counted (no delayed rejection
        # is held in monitor mode, so the HELO and MAIL checks run too)
        codes = await self.mail(
            "x@spf-fail.test", ["u@example.test"], source="127.0.0.2", spf="fail"
        )
        assert codes == [250, 250, 354, 250]
        t.add("would", "connect", "dnsbl", "reject")
        t.add("would", "mail", "spf", "reject")
        t.add("outcome", "accepted")
        t.add("eod")
        codes = await self.mail("a@example.org", ["u@example.test"], body("big score"))
        assert codes == [250, 250, 354, 250]
        t.add("would", "eod", "score", "reject")
        t.add("would", "eod", "score", "tag")  # monitor mode adds no X-Spam headers either
        self.hit("header.regexp", "big score")
        t.add("outcome", "accepted")
        t.add("eod")


# -- the tests ---------------------------------------------------------------------------


def test_promtool_checks_the_rule_files() -> None:
    need_binary(PROMTOOL, "promtool (Debian package prometheus)")
    out = subprocess.run(
        [PROMTOOL, "check", "rules", *map(str, RULE_FILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(RULE_FILES)


def test_alert_unit_tests() -> None:
    need_binary(PROMTOOL, "promtool (Debian package prometheus)")
    assert RULE_TESTS
    out = subprocess.run(
        [PROMTOOL, "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT / "grafana" / "prometheus" / "tests",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = set(re.findall(r"alertname: (\w+)", "".join(p.read_text() for p in RULE_TESTS)))
    assert tested == set(LIVE_ALERTS) | set(HISTORY_ALERTS)


def test_dashboard_is_importable_anywhere() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    assert "__inputs" not in dash  # nothing to map on import
    seen_ids = set()
    for p in panels(dash) + [r for r in dash["panels"] if r["type"] == "row"]:
        assert p["id"] not in seen_ids
        seen_ids.add(p["id"])
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        if p["type"] == "row":
            continue
        assert len(p.get("description", "")) > 30, p["title"]
        assert p["datasource"] == ds, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)) and refs, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == ds
    # no data source chosen by id or name anywhere
    text = DASHBOARD.read_text()
    assert set(re.findall(r'"uid": "([^"]*)"', text)) <= {
        "${datasource}",
        "-- Grafana --",
        "spamgate",
    }


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    prov = ROOT / "grafana" / "provisioning"
    dashboards = yaml.safe_load((prov / "dashboards" / "spamgate.yml").read_text())
    provider = dashboards["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"]
    sources = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"


@pytest.fixture
async def sink_refusing_nobody(sink: Sink) -> AsyncIterator[Sink]:
    sink.behaviour.refuse_local = "nobody"
    yield sink


async def test_traffic_as_prometheus_sees_it(
    sink_refusing_nobody: Sink,
    dns_server: DnsServer,
    tmp_path,
    postfix_factory: PostfixFactory,
    clamd: Clamd,
    spamd: Spamd,
    rspamd: Rspamd,
) -> None:
    need_binary(PROMETHEUS, "Prometheus (Debian package prometheus)")
    sink = sink_refusing_nobody
    rounds = int(os.environ.get("SPAMGATE_DASHBOARD_ROUNDS", "1"))
    png = os.environ.get("SPAMGATE_DASHBOARD_PNG")
    scripted.publish_dns(dns_server)
    dns_server.zone(URIBL_ZONE, {"listed-link.test": {"A": "127.0.0.2"}}, ttl=5, negative_ttl=5)
    postfix, milter_port = milter_postfix(postfix_factory)
    extra = '[limits]\nmessage_size = 20000\n\n[metrics]\nlisten = "127.0.0.1:0"\n\n'
    # a decision has 2 s less a margin: the scripted check's slow@ takes longer
    extra += f'[milter]\nlisten = ["inet:127.0.0.1:{milter_port}"]\ncommand_timeout = 2\n\n'
    extra += write_rules(tmp_path) + scripted.DNS_CHECKS + content_checks(clamd, spamd, rspamd)
    config = tmp_path / "spamgate.toml"
    # Reloads only on SIGHUP (not when the file changes), so the test counts them.
    server = {"reload_interval": "0"}

    def config_for(**srv: str) -> str:
        return config_text(sink, extra, server={**server, **srv}, dns=dns_server)

    config.write_text(config_for())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.scripted",
        "run",
        "-c",
        str(config),
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"},
    )
    gate = GateProcess(proc, config)
    prom: Prometheus | None = None
    try:
        metrics_addr = (await gate.wait_log(r"metrics on http://([\d.:]+)/metrics")).group(1)
        smtp_port = int((await gate.wait_log(r"listening on 127\.0\.0\.1:(\d+)")).group(1))
        prom = start_prometheus(tmp_path, metrics_addr)
        started = time.time()
        await prom.ready()
        await prom.wait_for(f'up{{job="{JOB}"}} == 1', timeout=30)

        tally = Tally()
        traffic = Traffic(smtp_port, tally)
        await gate.wait_log(r"milter listening on inet:127\.0\.0\.1")
        for i in range(rounds):
            await traffic.enforce_mix()
            await traffic.milter_mix(postfix.port)
            if i + 1 < rounds:
                await asyncio.sleep(5)
        await gate.reload(config_for(mode='"monitor"'), "reloaded configuration")
        tally.add("reload", "success")
        for i in range(max(1, rounds // 3)):
            await traffic.monitor_mix()
            if i + 1 < max(1, rounds // 3):
                await asyncio.sleep(5)
        await gate.reload(
            config.read_text() + "\n[limits]\nrecipients = 0\n", "refused; still running"
        )
        tally.add("reload", "failure")

        # Wait until a scrape holds the final counts; evaluate everything at that instant.
        sessions = tally.get("sessions")[()]
        await prom.wait_for(f'sum(spamgate_sessions_total{{job="{JOB}"}}) == {sessions}')
        await prom.wait_for(f'spamgate_config_reloads_total{{job="{JOB}",result="failure"}} == 1')
        await prom.wait_for('spamgate_config_last_reload_success{job="spamgate"} == 0')
        # A rule evaluation and another scrape after the one with the final counts:
        # at `at`, the last scrape, counters are exact and recording rules current.
        await asyncio.sleep(2)
        at = float(
            (await asyncio.to_thread(prom.query, f'timestamp(up{{job="{JOB}"}})'))[0]["value"][1]
        )

        await asyncio.to_thread(check_counts, prom, at, tally, rounds)
        # every query the DNS server received, and nothing else, counted as sent
        sent = (
            f'sum(spamgate_dns_queries_total{{job="{JOB}",result!~"cached|shared|breaker_open"}})'
        )
        assert prom.values(sent, at)[()] == dns_server.total > 0
        await asyncio.to_thread(check_dashboard, prom, at, tally)
        await asyncio.to_thread(check_rules, prom, at)
        # the milter's deadline, passed above: spamgate told Postfix to try later
        assert prom.query(alert_expr(prom, "SpamgateMilterFailing"), at)

        # DNS that fails: new clients whose lookups get SERVFAIL, until the share of
        # failed lookups over five minutes reaches SpamgateDNSFailing's threshold.
        dns_alert = alert_expr(prom, "SpamgateDNSFailing")
        for i in range(40, 90):
            source = f"127.0.0.{i}"
            rev = f"{i}.0.0.127"
            dns_server.fail(f"{rev}.in-addr.arpa", *(f"{rev}.{zone}" for zone in ZONES))
            c = await traffic.session(source)
            await c.cmd("QUIT")
            await c.close()
            if i % 5 == 4 and await asyncio.to_thread(prom.query, dns_alert):
                break
        await prom.wait_for(dns_alert)

        # A resolver that stops answering: a few sessions' lookups go unanswered,
        # the nameserver's breaker opens, the alert's expression fires.
        dns_server.down = True
        clients = await asyncio.gather(*(traffic.session(f"127.0.0.{i}") for i in (96, 97, 98)))
        for c in clients:
            await c.cmd("QUIT")
            await c.close()
        await prom.wait_for(alert_expr(prom, "SpamgateNameserverDown"))
        dns_server.down = False

        # An upstream that stops answering: messages fail, the alert expression fires.
        await sink.stop()
        for _ in range(3):
            c = await traffic.session()
            assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 451
            await c.close()
        await prom.wait_for(alert_expr(prom, "SpamgateUpstreamFailing"))
        if png:
            from .plotscript import plot

            await asyncio.sleep(3)
            await asyncio.to_thread(
                plot, prom.url, started - 5, time.time(), png, rate_interval="30s"
            )
        # spamgate stopped: the scrape fails and SpamgateDown's expression fires.
        assert await gate.stop() == 0
        await prom.wait_for(alert_expr(prom, "SpamgateDown"))
    finally:
        await gate.stop()
        if prom is not None:
            prom.proc.terminate()
            prom.proc.wait(timeout=15)


def alert_expr(prom: Prometheus, name: str) -> str:
    for group in prom.api("rules", type="alert")["groups"]:
        for rule in group["rules"]:
            if rule["name"] == name:
                return rule["query"]
    raise AssertionError(f"alert {name} not loaded")


def check_counts(prom: Prometheus, at: float, t: Tally, rounds: int) -> None:
    """Every counter equals what the traffic should have added, label set by label set."""
    sel = f'job="{JOB}"'

    def by(expr: str, labels: str) -> dict[tuple, float]:
        names = [n.strip() for n in labels.split(",")]
        return {
            tuple(dict(k)[n] for n in names): v
            for k, v in prom.values(f"sum by ({labels}) ({expr}{{{sel}}})", at).items()
        }

    def same(got: dict[tuple, float], want: collections.Counter, what: str) -> None:
        for key in set(got) | set(want):
            assert got.get(key, 0) == want.get(key, 0), (what, key, got.get(key), want.get(key))

    assert prom.values(f"sum(spamgate_sessions_total{{{sel}}})", at)[()] == t.get("sessions")[()]
    same(by("spamgate_verdicts_total", "stage, check, action"), t.get("verdict"), "verdicts")
    same(by("spamgate_monitor_verdicts_total", "stage, check, action"), t.get("would"), "would")
    same(by("spamgate_transactions_total", "outcome"), t.get("outcome"), "outcomes")
    same(by("spamgate_auth_results_total", "method, result"), t.get("auth"), "auth")
    same(by("spamgate_dnsbl_results_total", "zone, result"), t.get("dnsbl"), "dnsbl")
    same(by("spamgate_rule_hits_total", "table, rule"), t.get("rule"), "rule hits")
    same(by("spamgate_config_reloads_total", "result"), t.get("reload"), "reloads")
    same(by("spamgate_check_errors_total", "check, kind"), t.get("check_error"), "check errors")
    same(by("spamgate_milter_errors_total", "kind"), t.get("milter_error"), "milter errors")
    # both front ends counted their own sessions and transactions
    for frontend in ("proxy", "milter"):
        got = prom.values(f'sum(spamgate_sessions_total{{{sel}, frontend="{frontend}"}})', at)
        assert got[()] > 0, frontend
    eod = t.get("eod")[()]
    assert prom.values(f"sum(spamgate_message_size_bytes_count{{{sel}}})", at)[()] == eod
    assert prom.values(f"sum(spamgate_score_count{{{sel}}})", at)[()] == eod
    # the example, spelled out: seven relay refusals at RCPT show as seven
    relay = by("spamgate_verdicts_total", "stage, check, action")[("rcpt", "relay", "reject")]
    assert relay == 7 * rounds


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every variable query of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = [
        (f"{p['title']} [{tg['refId']}]", substitute(tg["expr"], VARIABLES))
        for p in panels(dash)
        for tg in p["targets"]
    ]
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
        assert m, v["query"]
        out.append(
            (
                f"variable {v['name']}",
                f"count by ({m.group(2)}) ({substitute(m.group(1), VARIABLES)})",
            )
        )
    return out


def check_dashboard(prom: Prometheus, at: float, t: Tally) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 40
    for where, expr in queries:
        result = prom.query(expr, at)
        assert result, f"{where}: no data for\n{expr}"
        values = [float(r["value"][1]) for r in result]
        assert any(math.isfinite(v) for v in values), f"{where}: only NaN for\n{expr}"

    def panel(title: str) -> dict[tuple, float]:
        (p,) = [p for p in panels(json.loads(DASHBOARD.read_text())) if p["title"] == title]
        return prom.values(substitute(p["targets"][0]["expr"], VARIABLES), at)

    refusals = collections.Counter()
    for (stage, _, action), n in t.get("verdict").items():
        if action in ("reject", "defer", "disconnect"):
            refusals[stage] += n
    got = {dict(k)["stage"]: v for k, v in panel("Refusals in the time range, by stage").items()}
    assert {s: v for s, v in got.items() if v} == dict(refusals)
    got = {(dict(k)["table"], dict(k)["rule"]): v for k, v in panel("Top rules").items()}
    assert {k: v for k, v in got.items() if v} == dict(t.get("rule"))
    got = {dict(k)["zone"]: v for k, v in panel("Top DNS lists").items()}
    assert got == {z: t.get("dnsbl")[(z, "listed")] for z in (*ZONES, URIBL_ZONE)}
    got = {dict(k)["frontend"] for k, v in panel("Sessions by front end").items() if v}
    assert got == {"proxy", "milter"}
    got = {dict(k)["symbol"]: v for k, v in panel("Top scanner symbols").items()}
    assert got == {"GTUBE": 1}  # one per scanner, in both: the symbol is the same
    got = {dict(k)["result"]: v for k, v in panel("Reloads in the time range").items()}
    assert got == {"success": 1, "failure": 1}
    assert panel("Active sessions") == {(): 0}
    assert panel("Configuration") == {(): 0}


def check_rules(prom: Prometheus, at: float) -> None:
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {g["file"] for g in groups} == {str(p) for p in RULE_FILES}
    alerts = {r["name"] for r in rules if r["type"] == "alerting"}
    assert alerts == set(LIVE_ALERTS) | set(HISTORY_ALERTS)
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
        if rule["type"] == "recording":
            result = prom.query(rule["name"], at)
            assert result, f"recording rule {rule['name']}: no data"
            assert all(math.isfinite(float(r["value"][1])) for r in result), rule["name"]
            continue
        # every series an alert reads exists (names and labels are right) ...
        for selector in selectors(rule["query"]):
            assert prom.query(selector, at), f"alert {rule['name']}: no data for {selector}"
    # ... and the one this run has provoked so far fires, in Prometheus's own alert list
    assert prom.query(alert_expr(prom, "SpamgateReloadFailed"), at)
    firing = {
        a["labels"]["alertname"] for a in prom.api("alerts")["alerts"] if a["state"] == "firing"
    }
    assert "SpamgateReloadFailed" in firing


def selectors(expr: str) -> list[str]:
    """The series selectors of a PromQL expression: metric names with their matchers."""
    expr = re.sub(r'"[^"]*"', lambda m: m.group(0).replace("(", "").replace(")", ""), expr)
    found = re.findall(
        r"(?<![\w:])((?:[a-z_]+:)?spamgate[a-z0-9_:]*|up)(\{[^}]*\})?(?=[\s\[)*/+\-<>=!,]|$)", expr
    )
    assert found, expr
    return sorted({name + (matchers or "") for name, matchers in found})
