"""A policy: one configuration, built and validated, as an immutable snapshot.

A reload builds a new one and swaps the reference; sessions keep the snapshot
they started with, so they finish on the rules they began with. It is built by
the composition root (`app.py`), which knows the registered checks.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from ..config import Config
from .runner import Pipeline


@dataclass(frozen=True)
class Policy:
    config: Config
    pipeline: Pipeline
    digest: str  # of the config file and every file its checks read
    # The STARTTLS certificate, loaded with this snapshot (a reload renews it).
    tls: ssl.SSLContext | None = None
