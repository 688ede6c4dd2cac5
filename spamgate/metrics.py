"""Every metric spamgate exports, defined in one place.

Names carry the `spamgate_` prefix and their unit; labels come from closed sets only
(stage, check, action, outcome, result, zone, table, rule id, command, kind) and never
from client addresses, mail addresses or domains, so cardinality stays bounded.
Other modules import the objects below and only call `.labels(...).inc()` or
`.observe()`; they never create metrics of their own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

REGISTRY = CollectorRegistry(auto_describe=True)

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

# -- sessions and transactions ------------------------------------------------------
SESSIONS = Counter("spamgate_sessions_total", "Client connections accepted.", registry=REGISTRY)
SESSIONS_ACTIVE = Gauge(
    "spamgate_sessions_active",
    "Client sessions open now.",
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
    "Connections refused before the greeting, by reason.",
    ["reason"],  # max_sessions, per_client, shutdown, pregreet, proxy, fd_limit
    registry=REGISTRY,
)
PROTOCOL_ERRORS = Counter(
    "spamgate_protocol_errors_total",
    "Client protocol violations, by kind.",
    # bare_newline, line_too_long, pipelining, pregreet, unknown_command, syntax,
    # too_many_errors, timeout, message_too_big, too_many_recipients, proxy_header
    ["kind"],
    registry=REGISTRY,
)
TRANSACTIONS = Counter(
    "spamgate_transactions_total",
    "Mail transactions by outcome.",
    # accepted, rejected, tempfailed, discarded, quarantined, upstream_rejected, aborted
    ["outcome"],
    registry=REGISTRY,
)
RECIPIENTS = Counter(
    "spamgate_recipients_total",
    "RCPT commands by outcome (accepted, rejected, tempfailed, relay_denied, upstream_rejected).",
    ["outcome"],
    registry=REGISTRY,
)
MESSAGE_SIZE = Histogram(
    "spamgate_message_size_bytes",
    "Size of messages received.",
    buckets=SIZE_BUCKETS,
    registry=REGISTRY,
)

# -- checks and verdicts ------------------------------------------------------------
VERDICTS = Counter(
    "spamgate_verdicts_total",
    "Final verdicts enforced, by stage, check and action.",
    ["stage", "check", "action"],
    registry=REGISTRY,
)
WOULD_VERDICTS = Counter(
    "spamgate_monitor_verdicts_total",
    "Verdicts not enforced because of monitor mode or WARN: what would have happened.",
    ["stage", "check", "action"],
    registry=REGISTRY,
)
CHECK_ERRORS = Counter(
    "spamgate_check_errors_total",
    "Checks that failed or timed out (their on_error policy applied).",
    ["check", "kind"],  # kind: timeout, exception
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
    "Rule table entries that matched, by table and rule (line).",
    ["table", "rule"],
    registry=REGISTRY,
)
SCORE = Histogram(
    "spamgate_score",
    "Total score of transactions at decision time.",
    buckets=SCORE_BUCKETS,
    registry=REGISTRY,
)

# -- DNS and authentication ---------------------------------------------------------
DNS_QUERIES = Counter(
    "spamgate_dns_queries_total",
    # cached: answered from the cache; shared: joined an identical query in flight
    "DNS lookups by type and result (answer, nxdomain, nodata, timeout, error, cached, shared).",
    ["type", "result"],
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
    "SPF, DKIM and DMARC results (method: spf, spf_helo, dkim, dmarc).",
    ["method", "result"],
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
    "Upstream reply latency by command (connect, starttls, xclient, ehlo, auth, mail, rcpt, "
    "data, rset).",
    ["command"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_ERRORS = Counter(
    "spamgate_upstream_errors_total",
    "Upstream failures by kind (connect, timeout, disconnect, protocol, xclient, tls, auth).",
    ["kind"],
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
    "When the configuration in use was loaded.",
    registry=REGISTRY,
    multiprocess_mode="max",
)
RELOAD_OK = Gauge(
    "spamgate_config_last_reload_success",
    "1 if the last reload attempt succeeded, 0 if it was refused.",
    registry=REGISTRY,
    multiprocess_mode="min",
)
CONFIG_INFO = Info(
    "spamgate_config", "Hash of the configuration and rule files in use.", registry=REGISTRY
)
BUILD_INFO = Info("spamgate_build", "Version of spamgate and its libraries.", registry=REGISTRY)
