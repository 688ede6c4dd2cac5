"""The configuration: one TOML file, read into typed, frozen sections.

`sections` holds the core's sections, `settings` the machinery every section
(the checks' too) is declared with, `loader` reads the file, with the sections
of the checks the composition root hands it (`app.load`), and reports every
problem at once as `file:line: message`.
"""

from __future__ import annotations

from .loader import (
    Config,
    InvalidConfig,
    cores_for_workers,
    hostname_problem,
    load,
    loads,
)
from .sections import (
    ARRAY_SECTIONS,
    CORE_SECTIONS,
    SASL_MECHANISMS,
    AuthSettings,
    DnsSettings,
    LimitSettings,
    Listener,
    ListenerSettings,
    MetricsSettings,
    MilterAddress,
    MilterSettings,
    ScoringSettings,
    ServerSettings,
    SmtpSettings,
    StateSettings,
    TlsSettings,
    UpstreamSettings,
    parse_milter_address,
)
from .settings import ConfigError

__all__ = [
    "ARRAY_SECTIONS",
    "CORE_SECTIONS",
    "SASL_MECHANISMS",
    "AuthSettings",
    "Config",
    "ConfigError",
    "DnsSettings",
    "InvalidConfig",
    "LimitSettings",
    "Listener",
    "ListenerSettings",
    "MetricsSettings",
    "MilterAddress",
    "MilterSettings",
    "ScoringSettings",
    "ServerSettings",
    "SmtpSettings",
    "StateSettings",
    "TlsSettings",
    "UpstreamSettings",
    "cores_for_workers",
    "hostname_problem",
    "load",
    "loads",
    "parse_milter_address",
]
