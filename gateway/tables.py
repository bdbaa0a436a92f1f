"""Typed reading of TOML tables that collects problems instead of raising.

Below config and the issuer kinds alike: config reads its tables through it, and each kind reads its own keys
of `[issuers.X]` (Kind.options) with it, so a kind's problems read like everyone else's and no kind imports config.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Problems", "Table", "did_you_mean"]


class Problems:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, file: Path, where: str, message: str) -> None:
        self.lines.append(f"{file.name}: {where}: {message}")


class Table:
    """Typed access to one TOML table that records problems instead of raising, and flags unknown keys.

    Issuer kinds read their own keys through it (`Kind.options`), so their problems read like everyone else's.
    """

    def __init__(self, data: Mapping[str, Any], file: Path, where: str, problems: Problems) -> None:
        self.data = data
        self.file = file
        self.where = where
        self.problems = problems
        self.seen: set[str] = set()

    def problem(self, key: str, message: str) -> None:
        self.problems.add(self.file, f"{self.where} {key}", message)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if required:
                self.problem(key, "is required")
            return default
        value = self.data[key]
        # bool is an int in Python; a `true` where a number belongs is a typo, not a 1.
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            self.problem(key, f"must be {_type_name(kind)} (got {type(value).__name__})")
            return default
        return value

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.get(key, str, default, required=required)
        if isinstance(value, str) and not value.strip():
            self.problem(key, "must not be empty")
            return default
        return value  # type: ignore[no-any-return]

    def number(
        self, key: str, default: float, *, minimum: float, maximum: float = 10**12, integer: bool = True
    ) -> Any:
        value = self.get(key, int if integer else (int, float), default)
        # `not (a <= v <= b)` rather than `v < a`: nan and inf are TOML floats, and fail every comparison.
        if not (minimum <= value <= maximum):
            self.problem(key, f"must be between {minimum} and {maximum} (got {value})")
            return default
        return value

    def strings(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key, list)
        if value is None:
            return None
        if not all(isinstance(item, str) and item for item in value):
            self.problem(key, "must be a list of non-empty strings")
            return None
        return tuple(value)

    def table(self, key: str) -> Table | None:
        """A sub-table (`[issuers.X.claims]`) as a Table of its own, its problems named by its full path."""
        value = self.get(key, dict)
        if value is None:
            return None
        return Table(value, self.file, f"{self.where[:-1]}.{key}]", self.problems)

    def finish(self) -> None:
        for key in sorted(set(self.data) - self.seen):
            self.problem(key, "unknown key" + did_you_mean(key, self.seen))


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the known name nearest to a misspelt `name`, or '' when none is near."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in _as_tuple(kind))
