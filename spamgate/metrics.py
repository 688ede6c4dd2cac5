"""Every metric spamgate exports, defined in one place.

Names carry the `spamgate_` prefix and their unit; labels come from closed sets only
(frontend, stage, check, action, outcome, result, zone, table, rule, command, kind, reason,
method, type, cause; nameserver from the configuration) and never from client
addresses, mail addresses or domains, so the number of series stays bounded
whatever the traffic. Other modules only call
`.labels(...).inc()`, `.observe()` or the small functions at the end; they never
create metrics of their own.

Series whose label values are known in advance are created at zero when the
process starts (and, for per-check series, when a configuration is loaded), so a
dashboard query returns 0 rather than nothing before the first event.

Several worker processes: the parent calls `enable_multiprocess(directory)` before
any worker starts, `worker_exited(pid)` when one ends, and serves
`scrape_registry()`, which sums the workers' per-process files (prometheus_client's
multiprocess mode). Each gauge below says how its values from several processes
combine (`multiprocess_mode`); counters and histograms are summed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
    values,
)

from . import __version__

# `<name>_created` series double the series count and no panel uses them.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
# Per-process figures (memory, CPU, open files, start time): they cannot be summed
# over workers, so multiprocess mode leaves them out.
_PROCESS: ProcessCollector | None = None
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    _PROCESS = ProcessCollector(registry=REGISTRY)

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 10485760, 33554432)
SCORE_BUCKETS = (-5, 0, 1, 2, 3, 5, 8, 10, 15, 20, 30, 50)

# -- the closed label sets ------------------------------------------------------------
TRANSACTION_OUTCOMES = (
    "accepted",
    "rejected",
    "tempfailed",
    "discarded",
    "quarantined",
    "upstream_rejected",
    "aborted",
)
RECIPIENT_OUTCOMES = ("accepted", "rejected", "tempfailed", "relay_denied", "upstream_rejected")
REFUSED_REASONS = ("max_sessions", "per_client", "shutdown", "proxy", "fd_limit")
PROTOCOL_ERROR_KINDS = (
    "bare_newline",
    "line_too_long",
    "syntax",
    "pipelining",
    "pregreet",
    "unknown_command",
    "non_smtp",
    "too_many_errors",
    "timeout",
    "message_too_big",
    "too_many_recipients",
    "header_too_big",
    "bare_cr",
    "proxy_header",
)
CHECK_ERROR_KINDS = ("timeout", "exception")
DNS_TYPES = ("A", "AAAA", "TXT", "PTR", "MX")
# cached: answered from the cache; shared: joined an identical query in flight;
# breaker_open: not sent, every nameserver being down. Only the others went to the
# network; timeout, error and breaker_open are failures.
DNS_RESULTS = (
    "answer",
    "nxdomain",
    "nodata",
    "timeout",
    "error",
    "cached",
    "shared",
    "breaker_open",
)
# RFC 8601 result words per method.
_SPF = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
AUTH_RESULT_SETS = {
    "spf": _SPF,
    "spf_helo": _SPF,
    "dkim": ("pass", "fail", "policy", "neutral", "none", "temperror", "permerror"),
    "dmarc": ("pass", "fail", "none", "temperror", "permerror"),
}
UPSTREAM_COMMANDS = (
    "connect",
    "starttls",
    "ehlo",
    "helo",
    "xclient",
    "auth",
    "mail",
    "rcpt",
    "data",
    "rset",
)
UPSTREAM_ERROR_KINDS = (
    "connect",
    "timeout",
    "disconnect",
    "protocol",
    "xclient",
    "refused",
    "tls",
    "auth",
)
STARTTLS_RESULTS = ("TLSv1.2", "TLSv1.3", "failure")
AUTH_PASSTHROUGH_RESULTS = ("success", "failure", "aborted", "error")
RELOAD_RESULTS = ("success", "failure")

# The front ends a session comes through: spamgate's own SMTP listener (proxy)
# or Postfix asking it (milter).
FRONTENDS = ("proxy", "milter")
# What went wrong on a milter connection: spamgate answered its fallback (tempfail)
# because a decision ran past its deadline or failed; the MTA broke the protocol
# or went silent (the connection is closed).
MILTER_ERROR_KINDS = ("deadline", "failure", "violation", "timeout")

# -- sessions and transactions ------------------------------------------------------
SESSIONS = Counter(
    "spamgate_sessions_total",
    "Client sessions accepted, by front end (proxy: connections to spamgate; milter: "
    "SMTP sessions Postfix asked about).",
    ["frontend"],
    registry=REGISTRY,
)
SESSIONS_ACTIVE = Gauge(
    "spamgate_sessions_active",
    "Client sessions open now, by front end.",
    ["frontend"],
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
STRESS = Gauge(
    "spamgate_stress",
    "1 while sessions are near max_sessions and the stress timeouts apply.",
    registry=REGISTRY,
    multiprocess_mode="max",
)
SESSIONS_REFUSED = Counter(
    "spamgate_sessions_refused_total",
    "Connections refused before the greeting because of a limit, by reason.",
    ["reason"],
    registry=REGISTRY,
)
PROTOCOL_ERRORS = Counter(
    "spamgate_protocol_errors_total",
    "Client protocol violations, by kind.",
    # bare_newline, line_too_long, pipelining, pregreet, unknown_command, syntax,
    # too_many_errors, timeout, message_too_big, header_too_big, too_many_recipients
    ["kind"],
    registry=REGISTRY,
)
TRANSACTIONS = Counter(
    "spamgate_transactions_total",
    "Mail transactions (MAIL FROM to the end of the message, RSET or QUIT) by front end "
    "and outcome.",
    ["frontend", "outcome"],
    registry=REGISTRY,
)
MILTER_ERRORS = Counter(
    "spamgate_milter_errors_total",
    "Milter connections that went wrong, by kind: deadline and failure (spamgate "
    "answered tempfail instead of a decision), violation and timeout (the MTA broke "
    "the protocol or went silent; the connection was closed).",
    ["kind"],
    registry=REGISTRY,
)
RECIPIENTS = Counter(
    "spamgate_recipients_total",
    "RCPT commands by outcome.",
    ["outcome"],
    registry=REGISTRY,
)
MESSAGE_SIZE = Histogram(
    "spamgate_message_size_bytes",
    "Size of the messages received (complete content, before spamgate's headers).",
    buckets=SIZE_BUCKETS,
    registry=REGISTRY,
)

# -- checks and verdicts ------------------------------------------------------------
VERDICTS = Counter(
    "spamgate_verdicts_total",
    "Final decisions enforced, by the stage they were made at, who made them (a check, "
    "or relay, score, limits, protocol) and action. A delayed rejection counts at the "
    "stage it was decided.",
    ["stage", "check", "action"],
    registry=REGISTRY,
)
WOULD_VERDICTS = Counter(
    "spamgate_monitor_verdicts_total",
    "Refusals not enforced (monitor mode, or WARN in a rule): what would have happened.",
    ["stage", "check", "action"],
    registry=REGISTRY,
)
CHECK_ERRORS = Counter(
    "spamgate_check_errors_total",
    "Checks that failed or timed out (their on_error policy applied).",
    ["check", "kind"],
    registry=REGISTRY,
)
CHECK_DURATION = Histogram(
    "spamgate_check_duration_seconds",
    "Time spent in each check.",
    ["check"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
RULE_HITS = Counter(
    "spamgate_rule_hits_total",
    "Rule table entries that matched (enforced or not), by table and rule id.",
    ["table", "rule"],
    registry=REGISTRY,
)
SCORE = Histogram(
    "spamgate_score",
    "Total score of messages at the end of data.",
    buckets=SCORE_BUCKETS,
    registry=REGISTRY,
)

# -- DNS and authentication ---------------------------------------------------------
DNS_QUERIES = Counter(
    "spamgate_dns_queries_total",
    # cached: answered from the cache; shared: joined an identical query in flight;
    # breaker_open: failed at once, every nameserver being down
    "DNS lookups by type and result (answer, nxdomain, nodata, timeout, error, cached, "
    "shared, breaker_open).",
    ["type", "result"],
    registry=REGISTRY,
)
DNS_NAMESERVER_UP = Gauge(
    "spamgate_dns_nameserver_up",
    "1 while the nameserver answers, 0 while it counts as down (its circuit breaker "
    "open: [dns] breaker_failures queries in a row went unanswered; probed until it "
    "answers).",
    ["nameserver"],
    registry=REGISTRY,
    # down in any live worker is down
    multiprocess_mode="livemin",
)
DNS_BREAKER_OPENED = Counter(
    "spamgate_dns_breaker_opened_total",
    "Times a nameserver was found down (its circuit breaker opened).",
    ["nameserver"],
    registry=REGISTRY,
)
DNS_LATENCY = Histogram(
    "spamgate_dns_query_duration_seconds",
    "Latency of DNS lookups that went to the network.",
    ["type"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
DNSBL_RESULTS = Counter(
    "spamgate_dnsbl_results_total",
    "DNS list lookups by zone and result (listed, not_listed, error).",
    ["zone", "result"],
    registry=REGISTRY,
)
AUTH_RESULTS = Counter(
    "spamgate_auth_results_total",
    "SPF, DKIM and DMARC results (method: spf, spf_helo, dkim, dmarc; RFC 8601 words).",
    ["method", "result"],
    registry=REGISTRY,
)
DMARC_INTERNAL_ERRORS = Counter(
    "spamgate_dmarc_internal_errors_total",
    "Messages whose DMARC policy could not be applied because a check inside spamgate "
    "failed (cause: spf, dkim, dmarc), not because of the sender or its DNS; "
    "[dmarc] internal_error decided.",
    ["cause"],
    registry=REGISTRY,
)
DMARC_INTERNAL_CAUSES = ("spf", "dkim", "dmarc")

# -- content checks (links, antivirus, external scorers, attachments) ---------------
URIBL_DOMAIN_RESULTS = ("looked_up", "allowlisted", "over_limit")
ATTACHMENT_KINDS = (
    "extension",
    "double_extension",
    "archive_member",
    "type_mismatch",
    "archive_unreadable",
)
CONTENT_SCANS = Counter(
    "spamgate_content_scans_total",
    "Messages a content check judged, by check and result (failures are in "
    "spamgate_check_errors_total).",
    ["check", "result"],
    registry=REGISTRY,
)
BACKEND_OUTAGES = Counter(
    "spamgate_backend_outages_total",
    "Outages of the daemons content checks ask (clamd, rspamd, spamd), counted once as "
    "each one starts; the messages it affected are in spamgate_check_errors_total.",
    ["check"],
    registry=REGISTRY,
)
SCANNER_SCORE = Histogram(
    "spamgate_scanner_score",
    "Scores rspamd and SpamAssassin gave the messages they scanned.",
    ["check"],
    buckets=SCORE_BUCKETS,
    registry=REGISTRY,
)
SCANNER_SYMBOLS = Counter(
    "spamgate_scanner_symbols_total",
    "rspamd symbols and SpamAssassin rules that fired, for the names listed in the "
    "check's count_symbols (a closed set).",
    ["check", "symbol"],
    registry=REGISTRY,
)
URIBL_DOMAINS = Counter(
    "spamgate_uribl_domains_total",
    "Link domains found in messages: looked up, allowlisted, or over_limit (past max_domains).",
    ["result"],
    registry=REGISTRY,
)
ATTACHMENT_FINDINGS = Counter(
    "spamgate_attachment_findings_total",
    "Attachment findings by kind (extension, double_extension, archive_member, "
    "type_mismatch, archive_unreadable).",
    ["kind"],
    registry=REGISTRY,
)

# -- TLS and AUTH passthrough -------------------------------------------------------
STARTTLS = Counter(
    "spamgate_starttls_total",
    "Inbound STARTTLS handshakes by result (the TLS version, or failure).",
    ["result"],  # TLSv1.2, TLSv1.3, failure
    registry=REGISTRY,
)
AUTH_PASSTHROUGH = Counter(
    "spamgate_auth_passthrough_total",
    "AUTH exchanges relayed to the upstream, by result (success, failure, aborted, error).",
    ["result"],
    registry=REGISTRY,
)

# -- upstream ----------------------------------------------------------------------
UPSTREAM_LATENCY = Histogram(
    "spamgate_upstream_duration_seconds",
    "Time the upstream took to answer, by command (connect includes the greeting).",
    ["command"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_CONNECTIONS = Counter(
    "spamgate_upstream_connections_total",
    "Upstream sessions by kind of connection: new (connect, greeting, EHLO) or reused "
    "(pooled, [upstream] pool_size).",
    ["kind"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "spamgate_upstream_errors_total",
    "Upstream failures by kind (connect, timeout, disconnect, protocol, xclient, refused, "
    "tls, auth).",
    ["kind"],
    registry=REGISTRY,
)
UPSTREAM_UP = Gauge(
    "spamgate_upstream_up",
    "1 if the last attempt to reach the upstream (a session or a /readyz probe) worked, "
    "0 if it failed, NaN before the first attempt.",
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",
)

# -- shared state (rate limits, greylisting, reputation) ----------------------------
STATE_UP = Gauge(
    "spamgate_state_store_up",
    "1 while the state store answers; 0 while it is unreachable ([state] on_unavailable).",
    registry=REGISTRY,
    # The latest answer of any live worker: "min" would also count a worker (or the
    # parent) that never asked, whose value is 0.
    multiprocess_mode="livemostrecent",
)
STATE_ERRORS = Counter(
    "spamgate_state_store_errors_total",
    "State store operations that failed (error) or were not tried while it was down (skipped).",
    ["op", "kind"],  # op: hit, first_seen, mark, marked, unmark, ping
    registry=REGISTRY,
)
STATE_LATENCY = Histogram(
    "spamgate_state_store_duration_seconds",
    "Latency of Redis state store operations.",
    ["op"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
STATE_PRIMARY_CHANGES = Counter(
    "spamgate_state_primary_changes_total",
    "Times the Sentinels named another Redis primary (a failover) and spamgate followed it.",
    registry=REGISTRY,
)
STATE_EVICTIONS = Counter(
    "spamgate_state_store_evictions_total",
    "Live entries the in-process store dropped to stay within [state] memory_max_keys.",
    registry=REGISTRY,
)
BACKGROUND_DROPPED = Counter(
    "spamgate_background_dropped_total",
    "Transaction outcomes not learned from because too many were still pending.",
    registry=REGISTRY,
)

# -- the capture ([capture]: records for spamgate replay) ----------------------------
CAPTURE_RESULTS = ("written", "dropped")
CAPTURE_STOP_REASONS = ("disk_full", "min_free", "error")
CAPTURE_RECORDS = Counter(
    "spamgate_capture_records_total",
    "Capture records written, or dropped (the capture stopped, or its writer fell behind); "
    "the mail is never affected.",
    ["result"],
    registry=REGISTRY,
)
CAPTURE_ACTIVE = Gauge(
    "spamgate_capture_active",
    "1 while [capture] writes records, 0 while it is stopped (disk full, below min_free, "
    "a write error); NaN without a capture.",
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
CAPTURE_STOPS = Counter(
    "spamgate_capture_stops_total",
    "Times the capture stopped writing, by reason (disk_full, min_free, error).",
    ["reason"],
    registry=REGISTRY,
)
CAPTURE_BYTES = Counter(
    "spamgate_capture_written_bytes_total",
    "Bytes of capture records written (before compression).",
    registry=REGISTRY,
)

# -- configuration and build --------------------------------------------------------
RELOADS = Counter(
    "spamgate_config_reloads_total",
    "Configuration reloads by result (success, failure).",
    ["result"],
    registry=REGISTRY,
)
RELOAD_TIMESTAMP = Gauge(
    "spamgate_config_last_reload_timestamp_seconds",
    "When the configuration in use was loaded (Unix time).",
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
RELOAD_OK = Gauge(
    "spamgate_config_last_reload_success",
    "1 if the last load or reload succeeded, 0 if it was refused (the previous one runs).",
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",
)
# Info metrics are gauges set to 1 (prometheus_client's Info does not work in
# multiprocess mode); `livemax` shows a hash while any live worker runs it.
CONFIG_INFO = Gauge(
    "spamgate_config_info",
    "Always 1; the hash label identifies the configuration in use.",
    ["hash"],
    registry=REGISTRY,
    multiprocess_mode="livemax",
)
BUILD_INFO = Gauge(
    "spamgate_build_info",
    "Always 1; labels give the versions of spamgate, Python and the main libraries.",
    ["version", "python", "aiosmtpd", "aiosmtplib", "dnspython", "pyspf", "dkimpy"],
    registry=REGISTRY,
    multiprocess_mode="max",
)


# -- results that checks report ------------------------------------------------------


@runtime_checkable
class Counted(Protocol):
    """A check's typed result that names the series it adds to.

    Checks never touch metrics; a result object (an SPF result, DNSBL findings)
    implements `counted()`, and the pipeline runner increments each series it
    yields: `yield metrics.AUTH_RESULTS, ("spf", "pass")`, or by exposition name,
    which needs no import of this module: `yield "spamgate_auth_results_total", (...)`.
    """

    def counted(self) -> Iterable[tuple[Counter | str, Sequence[str]]]: ...


def count_result(result: object) -> None:
    """Increment the series a `Counted` result names; other results count nothing.

    An item may also be (histogram, labels, value): the value is observed (a
    content scanner's score).
    """
    # What isinstance(result, Counted) decides, without its runtime-Protocol check
    # (about 20 us a call, three calls a message).
    counted = getattr(result, "counted", None)
    if counted is not None:
        for item in counted():
            if len(item) == 3:
                child(named(item[0]), *item[1]).observe(item[2])
            else:
                child(named(item[0]), *item[1]).inc()


_by_name: dict[str, Any] = {}


def named(metric: Counter | Histogram | str) -> Any:
    """A metric, or the metric of that exposition name ("spamgate_content_scans_total").

    Checks and their engines name series by these names, so that they need not
    import this module (KeyError for a name that is not defined here).
    """
    if not isinstance(metric, str):
        return metric
    if not _by_name:
        for obj in _metric_objects():
            _by_name[obj._name] = obj
            if isinstance(obj, Counter):
                _by_name[obj._name + "_total"] = obj
    return _by_name[metric]


_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def child(metric: Counter | Gauge | Histogram, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once: hot paths call this per message.

    Only for series never removed (all but spamgate_config_info); the cache is
    emptied when enable_multiprocess() replaces every series.
    """
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


# -- series created at zero ----------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"version": __version__, "python": platform.python_version()}
    for label, dist in (
        ("aiosmtpd", "aiosmtpd"),
        ("aiosmtplib", "aiosmtplib"),
        ("dnspython", "dnspython"),
        ("pyspf", "pyspf"),
        ("dkimpy", "dkimpy"),
    ):
        try:
            out[label] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[label] = "none"
    return out


def _precreate() -> None:
    """Create every series whose labels are known before any traffic."""
    for frontend in FRONTENDS:
        SESSIONS.labels(frontend)
        SESSIONS_ACTIVE.labels(frontend)
        for outcome in TRANSACTION_OUTCOMES:
            TRANSACTIONS.labels(frontend, outcome)
    for kind in MILTER_ERROR_KINDS:
        MILTER_ERRORS.labels(kind)
    for outcome in RECIPIENT_OUTCOMES:
        RECIPIENTS.labels(outcome)
    for reason in REFUSED_REASONS:
        SESSIONS_REFUSED.labels(reason)
    for kind in PROTOCOL_ERROR_KINDS:
        PROTOCOL_ERRORS.labels(kind)
    for kind in UPSTREAM_ERROR_KINDS:
        UPSTREAM_ERRORS.labels(kind)
    for kind in ("new", "reused"):
        UPSTREAM_CONNECTIONS.labels(kind)
    for command in UPSTREAM_COMMANDS:
        UPSTREAM_LATENCY.labels(command)
    for rtype in DNS_TYPES:
        DNS_LATENCY.labels(rtype)
        for result in DNS_RESULTS:
            DNS_QUERIES.labels(rtype, result)
    for method, results in AUTH_RESULT_SETS.items():
        for result in results:
            AUTH_RESULTS.labels(method, result)
    for cause in DMARC_INTERNAL_CAUSES:
        DMARC_INTERNAL_ERRORS.labels(cause)
    for result in RELOAD_RESULTS:
        RELOADS.labels(result)
    for result in URIBL_DOMAIN_RESULTS:
        URIBL_DOMAINS.labels(result)
    for kind in ATTACHMENT_KINDS:
        ATTACHMENT_FINDINGS.labels(kind)
    for result in STARTTLS_RESULTS:
        STARTTLS.labels(result)
    for result in AUTH_PASSTHROUGH_RESULTS:
        AUTH_PASSTHROUGH.labels(result)
    for result in CAPTURE_RESULTS:
        CAPTURE_RECORDS.labels(result)
    for reason in CAPTURE_STOP_REASONS:
        CAPTURE_STOPS.labels(reason)
    CAPTURE_ACTIVE.set(float("nan"))
    BUILD_INFO.labels(**_versions()).set(1)
    # Unknown until the first session or /readyz probe reaches (or misses) the MTA:
    # NaN, not 0, so "upstream down" alerts do not fire on an idle, fresh process.
    UPSTREAM_UP.set(float("nan"))


def declare_checks(
    checks: Iterable[tuple[str, Iterable[str], Iterable[tuple[Counter, Sequence[str]]]]],
) -> None:
    """Create a configuration's per-check series at zero.

    One (check label, its stages, the series it names) per check; the last come
    from `Check.metric_series()` (rule ids, DNS list zones).
    """
    for label, stages, series in checks:
        for counter, labels in series:
            named(counter).labels(*labels)
        CHECK_DURATION.labels(label)
        for kind in CHECK_ERROR_KINDS:
            CHECK_ERRORS.labels(label, kind)
        for stage in stages:
            for action in ("reject", "defer"):
                VERDICTS.labels(stage, label, action)
                WOULD_VERDICTS.labels(stage, label, action)


def declare_core(decisions: Iterable[tuple[str, str, str, bool]]) -> None:
    """Create the series of the core's own decisions (relay, limits, protocol,
    score: `Pipeline.series()`) at zero: (stage, label, action, may be monitored).
    Only final actions are enforced decisions; the score's "tag" is only ever a
    monitor-mode "would"."""
    for stage, label, action, monitored in decisions:
        if action != "tag":
            VERDICTS.labels(stage, label, action)
        if monitored:
            WOULD_VERDICTS.labels(stage, label, action)


_config_hash: str | None = None


def note_config(digest: str, loaded_at: float) -> None:
    """Publish the configuration now in use (its hash and when it was loaded)."""
    global _config_hash
    if _config_hash is not None and _config_hash != digest:
        # Zero first: in multiprocess mode the value lives on in this process's file.
        CONFIG_INFO.labels(_config_hash).set(0)
        CONFIG_INFO.remove(_config_hash)
    CONFIG_INFO.labels(digest).set(1)
    RELOAD_TIMESTAMP.set(loaded_at)
    _config_hash = digest


_precreate()


# -- several worker processes ----------------------------------------------------------

_multiprocess_dir: str | None = os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def _metric_objects() -> list:
    return [
        obj
        for obj in globals().values()
        if isinstance(obj, Counter | Gauge | Histogram) and obj._name.startswith("spamgate_")
    ]


def enable_multiprocess(directory: str) -> None:
    """Keep this process's values in files under `directory`, for a summed scrape.

    Call it once, in the parent, before workers start (fork or spawn): it empties
    the directory (files of an earlier run would be counted again), sets
    PROMETHEUS_MULTIPROC_DIR for spawned workers, and moves every value defined
    above into the files, at zero. Forked workers write their own files from
    their first update on (prometheus_client notices the new pid).
    """
    global _multiprocess_dir, _config_hash, _PROCESS
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    _multiprocess_dir = directory
    _children.clear()
    values.ValueClass = values.MultiProcessValue()
    if _PROCESS is not None:
        REGISTRY.unregister(_PROCESS)
        _PROCESS = None
    for metric in _metric_objects():
        if metric._labelnames:
            metric.clear()
        else:
            metric._metric_init()  # a new value object of the file-backed class
    _config_hash = None
    _precreate()


def worker_exited(pid: int) -> None:
    """In the parent, when a worker has ended: drop its live gauges from the sums."""
    if _multiprocess_dir is not None:
        multiprocess.mark_process_dead(pid, _multiprocess_dir)


def remove_multiprocess_files() -> None:
    """In the parent, at shutdown: remove the per-process files."""
    if _multiprocess_dir is not None:
        shutil.rmtree(_multiprocess_dir, ignore_errors=True)


def scrape_registry() -> CollectorRegistry:
    """The registry /metrics serves: this process's, or the sum over all workers."""
    if _multiprocess_dir is None:
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=_multiprocess_dir)
    return registry
