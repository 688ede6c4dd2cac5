"""Typed configuration sections declared as dataclasses, read from one TOML file.

Each section is a frozen dataclass whose fields carry a default and a one-line doc
(`setting(...)`); the loader converts and validates values and reports every error
as `file:line: message`, so `spamgate check` can list them all at once. Sections are
registered by the module that owns them (the core here, each check in its own
module), which keeps one check's settings next to its code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, get_args, get_origin


class ConfigError(Exception):
    """A list of `file:line: message` problems."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def setting(
    default: Any,
    doc: str,
    *,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A documented field; `check` returns an error text for a bad value."""
    meta = {"doc": doc, "check": check}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# ---- small validators shared by sections -------------------------------------------

_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\s]+)):(?P<port>\d{1,5})$")


def parse_hostport(text: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" → (host, port); ValueError with a readable text."""
    m = _HOSTPORT.match(text.strip())
    if not m:
        raise ValueError(f'"{text}" is not "host:port"')
    port = int(m.group("port"))
    if not 0 <= port < 65536:
        raise ValueError(f'port {port} out of range in "{text}"')
    return (m.group("v6") or m.group("host")), port


def hostports(value: list[str]) -> str | None:
    for item in value:
        try:
            parse_hostport(item)
        except ValueError as exc:
            return str(exc)
    return None


def hostport_or_empty(value: str) -> str | None:
    return None if not value else hostports([value])


def networks(value: list[str]) -> str | None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f'"{item}" is not an IP network'
    return None


def positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


# ---- the loader ------------------------------------------------------------------


def display_path(path: str) -> str:
    """A file as errors name it: where it really is (a path in the configuration is
    relative to the configuration file, not to where the command runs), relative to
    the working directory when it lies below it, so an admin can open it as shown.
    A path that would climb out of the working directory (`../../etc/x`) is shown
    whole: it is no easier to open, and it would change with where the command runs."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return absolute
    return relative if len(relative) < len(absolute) else absolute


def unreadable(exc: OSError) -> str:
    """Why a file named in the configuration could not be opened, in the words
    every such error uses ("rules/client.cidr: no such file")."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory, not a file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


_HEADER = re.compile(r"^\[\[?(?P<name>[^\]]*)\]\]?\s*(?:#.*)?$")
_KEY_PART = re.compile(
    r"""\s*(?:"(?P<basic>(?:[^"\\]|\\.)*)"|'(?P<literal>[^']*)'|(?P<bare>[A-Za-z0-9_-]+))\s*"""
)


def _dotted_key(text: str) -> tuple[list[str], str] | None:
    """The parts of the TOML (dotted) key at the start of `text`, and what follows."""
    parts: list[str] = []
    pos = 0
    while True:
        m = _KEY_PART.match(text, pos)
        if not m:
            return None
        part = m.group("basic")
        if part is not None:
            part = part.replace('\\"', '"').replace("\\\\", "\\")
        else:
            part = m.group("literal") if m.group("literal") is not None else m.group("bare")
        parts.append(part)
        pos = m.end()
        if not text.startswith(".", pos):
            return parts, text[pos:]
        pos += 1


@dataclass
class Located:
    """Where a key sits in the source text, to print `file:line:`."""

    path: str
    text: str

    def line_of(self, section: str, key: str | None = None, item: str | None = None) -> int:
        """Best-effort line number of `[section]`, of `key` inside it, or of `item`
        inside the table `key` (`[ratelimit.overrides]` "cidr:x" = ...); the nearest
        enclosing line found when the exact one is not (an inline table's line, the
        section header), 1 when none is."""
        target = [*(section.split(".") if section else []), *(k for k in (key, item) if k)]
        best, best_len = 0, 0
        current: list[str] = []
        for lineno, raw in enumerate(self.text.splitlines(), 1):
            line = raw.strip()
            header = _HEADER.match(line)
            if header:
                parsed = _dotted_key(header.group("name"))
                current = parsed[0] if parsed and not parsed[1] else []
                path = current
            else:
                parsed = _dotted_key(line)
                if parsed is None or not parsed[1].startswith("="):
                    continue
                path = current + parsed[0]
            if path == target[: len(path)] and len(path) > best_len:
                best, best_len = lineno, len(path)
                if best_len == len(target):
                    break
        return best or 1

    def at(self, section: str, key: str | None, message: str, item: str | None = None) -> str:
        return f"{self.path}:{self.line_of(section, key, item)}: {message}"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple):
        return "a list"
    if origin is dict:
        return "a table"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any) -> Any:
    """Convert a TOML value to `tp`, or raise TypeError with a readable reason."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value)
            except TypeError:
                continue
        raise TypeError(f"expected {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise TypeError(f"expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item,) = get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise TypeError("expected a list")
        return [_convert(item, v) for v in value]
    if origin is dict:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, dict):
            raise TypeError("expected a table")
        return {_convert(key_tp, k): _convert(val_tp, v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError("expected a table")
        return value  # nested sections are built by build_section
    raise TypeError(f"unsupported type {tp!r}")


def build_section(
    cls: type, raw: dict[str, Any], name: str, where: Located, problems: list[str]
) -> Any:
    """Build one section dataclass from its TOML table, collecting problems."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key, value in raw.items():
        attr = key.replace("-", "_")
        if attr not in known:
            problems.append(where.at(name, key, f"unknown setting '{key}' in [{name}]"))
            continue
        tp = hints[attr]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                problems.append(where.at(name, key, f"[{name}] {key}: expected a table"))
                continue
            kwargs[attr] = build_section(tp, value, f"{name}.{key}", where, problems)
            continue
        check = known[attr].metadata.get("check")
        # A table's entries are judged one by one, each reported at its own line.
        items = value.items() if get_origin(tp) is dict and isinstance(value, dict) else [None]
        converted: Any = {}
        valid = True
        for item in items:
            try:
                piece = _convert(tp, value if item is None else dict([item]))
                error = check(piece) if check is not None else None
            except TypeError as exc:
                error = str(exc)
            if error:
                at = None if item is None else item[0]
                problems.append(where.at(name, key, f"[{name}] {key}: {error}", item=at))
                valid = False
            elif item is None:
                converted = piece
            else:
                converted.update(piece)
        if valid:
            kwargs[attr] = converted
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(where.at(name, None, f"[{name}]: {exc}"))
        return cls()


def describe(cls: type, prefix: str) -> list[tuple[str, str, str]]:
    """(key, default, doc) for every setting of a section, for the reference docs."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}.{f.name}"))
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append((f"[{prefix}] {f.name}", _toml_value(default), f.metadata.get("doc", "")))
    return rows


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if value is None:
        return "(unset)"
    return str(value)
