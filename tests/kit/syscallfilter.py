"""The shipped systemd unit's system-call filter, applied to a process in a test.

systemd builds a seccomp filter from a unit's `SystemCallFilter=` lines; a call
it filters fails with `SystemCallErrorNumber=` (EPERM in ours) instead of
running. Code that works in a terminal can fail there: the DKIM worker pool
once died on `os.nice()` (setpriority is in @resources, which the unit denies).
So tests run spamgate under the same filter:

    python -m tests.kit.syscallfilter deploy/systemd/spamgate.service -- spamgate run -c x.toml

reads the unit, expands its groups with `systemd-syscall-groups.txt` (what
`systemd-analyze syscall-filter` prints, source cited there), loads the filter
with libseccomp (the `pyseccomp` binding) and executes the command under it.

The rules are systemd.exec(5)'s: the first list decides the default (an allow
list denies everything else, and brings @default with it, as systemd does); a
later list adds to or takes from it, "~" meaning deny; an empty assignment starts
again; `name:errno` gives one call its own errno. Only the filter is applied:
the unit's user, capabilities and namespaces are systemd's, not seccomp's.
"""

from __future__ import annotations

import errno
import os
import pathlib
import sys
from dataclasses import dataclass, field

GROUPS_FILE = pathlib.Path(__file__).with_name("systemd-syscall-groups.txt")


def load_groups(path: pathlib.Path = GROUPS_FILE) -> dict[str, list[str]]:
    """{"@group": [members, which may be groups]} from systemd-analyze's listing."""
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in path.read_text().splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and not line.strip().startswith("#") and line.strip():
            if current is None:
                raise ValueError(f"{path}: a system call outside any group: {line!r}")
            current.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]], seen: frozenset[str] = frozenset()) -> set[str]:
    """The system calls `name` stands for (a group is expanded recursively)."""
    if not name.startswith("@"):
        return {name}
    if name not in groups:
        raise KeyError(f"unknown system call group {name} (not in {GROUPS_FILE.name})")
    if name in seen:
        return set()
    out: set[str] = set()
    for member in groups[name]:
        out |= expand(member, groups, seen | {name})
    return out


@dataclass
class Filter:
    """What a unit's lines amount to: allow-list or deny-list, and the calls in it."""

    allow_list: bool | None = None  # None: no filter
    calls: dict[str, int | None] = field(default_factory=dict)  # call -> own errno
    errno: int | None = None  # SystemCallErrorNumber=; None: the process is killed

    def denies(self, call: str) -> bool:
        if self.allow_list is None:
            return False
        return (call not in self.calls) if self.allow_list else (call in self.calls)


def unit_directives(text: str, key: str) -> list[str]:
    """The values of `key=` in a unit's [Service] section, in order."""
    values: list[str] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        name, sep, value = line.partition("=")
        if sep and section == "[Service]" and name.strip() == key:
            values.append(value.strip())
    return values


def unit_filter(text: str, groups: dict[str, list[str]] | None = None) -> Filter:
    """The seccomp filter systemd builds from a unit's SystemCallFilter= lines."""
    groups = load_groups() if groups is None else groups
    result = Filter()
    for value in unit_directives(text, "SystemCallFilter"):
        if not value:  # an empty assignment resets the list
            result = Filter()
            continue
        invert = value.startswith("~")
        if result.allow_list is None:
            result.allow_list = not invert
            if result.allow_list:
                for call in expand("@default", groups):
                    result.calls[call] = None
        for item in value.lstrip("~").split():
            name, _, code = item.partition(":")
            own = _errno(code) if code else None
            for call in expand(name, groups):
                if invert == (not result.allow_list):  # same kind as the list: add
                    result.calls[call] = own
                else:
                    result.calls.pop(call, None)
    for value in unit_directives(text, "SystemCallErrorNumber"):
        result.errno = _errno(value) if value else None
    return result


def _errno(name: str) -> int:
    return int(name) if name.isdigit() else getattr(errno, name)


def load(spec: Filter) -> None:
    """Apply `spec` to this process (and so to everything it executes)."""
    import pyseccomp as seccomp

    if spec.allow_list is None:
        return
    denied = seccomp.KILL_PROCESS if spec.errno is None else seccomp.ERRNO(spec.errno)
    default = denied if spec.allow_list else seccomp.ALLOW
    f = seccomp.SyscallFilter(default)  # native architecture only, no_new_privs set
    for call, own in sorted(spec.calls.items()):
        try:
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, call)
        except (OSError, ValueError):
            continue  # unknown to this libseccomp
        if number == -1:
            continue
        if spec.allow_list:
            f.add_rule(seccomp.ALLOW, number)
        else:
            f.add_rule(seccomp.ERRNO(own) if own is not None else denied, number)
    f.load()


def main(argv: list[str]) -> None:
    if "--" not in argv or argv.index("--") != 1 or len(argv) < 3:
        sys.exit("usage: python -m tests.kit.syscallfilter UNIT -- COMMAND [ARG...]")
    unit, command = argv[0], argv[2:]
    load(unit_filter(pathlib.Path(unit).read_text()))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
