"""A check's recorded result, rebuilt as the type it was: only types spamgate knows.

A capture keeps a result as its fields and the name of its type
(`capture.encode.value`). Here the name is looked up among the dataclasses that
spamgate's own check modules define, and the type is built from the fields, as
data: a name that is not one of them (another program's class, a function, a
module) is an error, never imported; nothing is evaluated. A capture of another
site can therefore name nothing that runs.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib
import pkgutil
from typing import Any

from .. import checks as checks_package

_MAX_DEPTH = 32


class ResultError(ValueError):
    """A recorded result that cannot be rebuilt."""


def _known_types() -> dict[str, type]:
    """Every dataclass defined by a module of spamgate.checks (results and their
    parts), by name."""
    found: dict[str, type] = {}
    prefix = checks_package.__name__ + "."
    for info in pkgutil.walk_packages(checks_package.__path__, prefix):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and dataclasses.is_dataclass(value)
                and value.__module__ == module.__name__
                and not value.__name__.endswith("Settings")
            ):
                found.setdefault(value.__name__, value)
    return found


_TYPES: dict[str, type] | None = None


def known_types() -> dict[str, type]:
    global _TYPES
    if _TYPES is None:
        _TYPES = _known_types()
    return _TYPES


def rebuild(value: Any, depth: int = 0) -> Any:
    """The value a check returned, from its recorded form; ResultError if it is
    not one spamgate could have written."""
    if depth > _MAX_DEPTH:
        raise ResultError("a result nested too deeply")
    if isinstance(value, list):
        return tuple(rebuild(x, depth + 1) for x in value)
    if not isinstance(value, dict):
        return value
    if "@type" in value:
        name = value["@type"]
        kind = known_types().get(name) if isinstance(name, str) else None
        if kind is None:
            raise ResultError(f"a result of unknown type {name!r}")
        fields = {f.name for f in dataclasses.fields(kind) if f.init}
        given = {k: rebuild(v, depth + 1) for k, v in value.items() if k != "@type"}
        extra = set(given) - fields
        if extra:
            raise ResultError(f"{name} has no field {sorted(extra)[0]!r}")
        try:
            return kind(**given)
        except (TypeError, ValueError) as exc:
            raise ResultError(f"{name}: {exc}") from None
    if "@set" in value and isinstance(value["@set"], list):
        try:
            return frozenset(rebuild(x, depth + 1) for x in value["@set"])
        except TypeError:
            raise ResultError("a set of values that cannot be in one") from None
    if "@bytes" in value and isinstance(value["@bytes"], str):
        try:
            return base64.b64decode(value["@bytes"], validate=True)
        except (binascii.Error, ValueError):
            raise ResultError("bytes that are not base64") from None
    return {k: rebuild(v, depth + 1) for k, v in value.items()}
