"""Capture: a record of what each transaction's checks used and decided.

`[capture]` (off by default) makes the composition root wrap the resolver and
the state store (`recording`) and give every session driver a recorder
(`recorder`), whose records a thread writes (`writer`) as JSON lines
(`encode`, docs/capture.md). `spamgate replay` runs them again against another
configuration; `spamgate report` sums them up.
"""

from __future__ import annotations

from .encode import FORMAT
from .recorder import Capture, SessionRecorder
from .recording import TAPE, RecordingResolver, RecordingStore
from .settings import CaptureSettings

__all__ = [
    "FORMAT",
    "TAPE",
    "Capture",
    "CaptureSettings",
    "RecordingResolver",
    "RecordingStore",
    "SessionRecorder",
]
