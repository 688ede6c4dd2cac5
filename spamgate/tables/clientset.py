"""A lookup table used as a set of clients: who is allowlisted, who is a partner.

Some settings need only "is this client one of them?" (greylisting's allowlist, the
clients a rate-limit override applies to). They take ordinary tables (`cidr:`,
`hash:`, `regexp:`, looked up by client address and verified name as at connect),
in which `OK` means "one of them" and `DUNNO` makes an exception (`192.0.2.9 DUNNO`
before `192.0.2.0/24 OK`). Any other action would have no meaning here, so it is a
`file:line` error when the table is loaded, not an action silently ignored.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..config.settings import ConfigError
from . import Query, Table, TableLimits, load_configured, split_spec

if TYPE_CHECKING:
    from ..config import Config
    from ..model import Client

MEMBER_WORDS = ("OK", "DUNNO")


class ClientSet:
    def __init__(self, table: Table, timeout: float) -> None:
        self.table = table
        self.timeout = timeout

    @property
    def spec(self) -> str:
        return self.table.spec

    @classmethod
    def load(
        cls,
        spec: str,
        config: Config,
        what: str,
        setting: tuple[str, ...],
        *,
        limits: TableLimits,
        timeout: float,
    ) -> ClientSet:
        """Load `spec`; `what` names the setting in errors ("a greylist allowlist"),
        `setting` is where the configuration names it: (section, key[, item]);
        `limits` and `timeout` bound each lookup (TableTimeout beyond)."""
        table = load_configured(spec, config, *setting, limits=limits)
        entries = table.entries  # type: ignore[attr-defined]  # every table type has them
        entries = entries.values() if isinstance(entries, dict) else entries
        problems = [
            f"{table.path}:{e.line}: {what} says OK or DUNNO, not {e.action.word}"
            for e in entries
            if e.action.word not in MEMBER_WORDS
        ]
        if problems:
            raise ConfigError(problems)
        return cls(table, timeout)

    def __contains__(self, client: Client) -> bool:
        name = None if client.name.startswith("[") else client.name
        query = Query("client", name=name, ip=client.address)
        match = self.table.first(query, time.monotonic() + self.timeout)
        return match is not None and match.action.word == "OK"


def source_of(spec: str, config: Config) -> str:
    """The file behind a table spec, for the reload watcher (`Check.sources`)."""
    return config.resolve_path(split_spec(spec)[1])
