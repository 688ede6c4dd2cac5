"""Reading a table file into logical lines, as Postfix does for its text tables.

`#` lines and blank lines are ignored; a line that starts with whitespace continues
the previous logical line. Each logical line keeps the number of its first physical
line, which is what every error message and every rule reference (`table:line`)
points at, so an admin can jump straight to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.settings import ConfigError, unreadable


class UnreadableTable(ConfigError):
    """The table file as a whole cannot be read (missing, a directory, not allowed):
    reported at the configuration line that names it."""


@dataclass(frozen=True, slots=True)
class LogicalLine:
    number: int
    text: str


def read_lines(path: str, display: str | None = None) -> list[LogicalLine]:
    """The logical lines of the table at `path`; ConfigError on unreadable input.

    `display` is how the file is named in errors.
    """
    where = display or path
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise UnreadableTable([f"{where}: {unreadable(exc)}"]) from None
    return split_lines(data, where)


def split_lines(data: bytes, where: str) -> list[LogicalLine]:
    problems: list[str] = []
    out: list[LogicalLine] = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            problems.append(f"{where}:{number}: not UTF-8 text")
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if line[0] in " \t":
            if not out:
                problems.append(
                    f"{where}:{number}: continuation line (it starts with whitespace) "
                    "without a line to continue"
                )
                continue
            prev = out[-1]
            out[-1] = LogicalLine(prev.number, prev.text + line.rstrip())
            continue
        out.append(LogicalLine(number, line.rstrip()))
    if problems:
        raise ConfigError(problems)
    return out
