"""[capture]: what `spamgate run` records of each transaction, and where.

Off by default. Read once when spamgate starts (like [state]): a reload does not
start or stop a capture. docs/capture.md describes the records, docs/tuning.md
what to do with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import non_negative, positive, setting

MIB = 1024 * 1024


def _level(value: int) -> str | None:
    return None if 1 <= value <= 9 else "must be between 1 (fastest) and 9 (smallest)"


@dataclass(frozen=True)
class CaptureSettings:
    enabled: bool = setting(
        False,
        "Record what each transaction's checks used and decided (docs/capture.md), for "
        "`spamgate replay` and `spamgate report`.",
    )
    directory: str = setting(
        "capture",
        "Directory of the capture files (relative to this file's directory); made if missing.",
    )
    file_size: int = setting(
        64 * MIB, "Bytes a capture file grows to before the next one is started.", check=positive
    )
    file_age: float = setting(
        3600.0,
        "Seconds a capture file is written to before the next one is started.",
        check=positive,
    )
    total_size: int = setting(
        1024 * MIB,
        "Bytes all capture files may take together; the oldest are deleted beyond it.",
        check=positive,
    )
    max_age: float = setting(
        7 * 86400.0, "Seconds a capture file is kept; older ones are deleted.", check=positive
    )
    min_free: int = setting(
        1024 * MIB,
        "Bytes that must stay free on the capture's file system: below it the capture "
        "stops (never the mail), with a log line and spamgate_capture_active 0.",
        check=non_negative,
    )
    compress_level: int = setting(
        6, "gzip level of a capture file once it is complete (1 fastest, 9 smallest).", check=_level
    )
    header_size: int = setting(
        16384,
        "Bytes of a message's header section kept; a longer one is cut (and replayed "
        "from its recorded end-of-data verdicts).",
        check=positive,
    )
    store_messages: bool = setting(
        False,
        "Keep whole messages (up to message_size), so a replay can run the content "
        "checks again; otherwise a message is kept as its header section, size and SHA-256.",
    )
    message_size: int = setting(
        1 * MIB,
        "With store_messages: bytes of the largest message kept whole; a larger one is "
        "kept as its header section, size and SHA-256.",
        check=positive,
    )
    redact: bool = setting(
        False,
        "Replace the local parts of addresses (envelope, header fields, AUTH login) with "
        "keyed hashes, for sites that may not keep addresses; not with store_messages.",
    )
    redact_key_file: str = setting(
        "",
        "File holding the redaction key (32+ bytes); empty: redact.key in directory, "
        "made on first use. Keep it to compare the hashes of two captures.",
    )
    queue_size: int = setting(
        10000,
        "Records waiting for the writer at most; beyond it records are dropped and "
        'counted (spamgate_capture_records_total{result="dropped"}), mail goes on.',
        check=positive,
    )

    def __post_init__(self) -> None:
        if self.redact and self.store_messages:
            raise ValueError(
                "redact and store_messages exclude each other: a stored message keeps "
                "the addresses redact hides"
            )
