"""Reading lcmla's JSON files with one-line errors, and a small schema checker for them (``lcmla.json``, export ``manifest.json``), run before any field is
used, so that a hand-edited or damaged manifest gets an error naming the field instead of a ``KeyError`` later.

Schemas are built from :class:`Is` (types; ``bool`` is never taken for an ``int``), :class:`Object` (required and
optional keys, nothing else), :class:`ListOf`, :class:`MapOf` (string keys), :class:`OneOf` (fixed values),
:class:`Check` (a predicate and what it means) and :class:`Either`. Each format's schema lives beside its code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelFilesError


def parse_json(path: Path) -> Any:
    """A JSON file's value; unreadable, non-UTF-8 or malformed files are a one-line :class:`ModelFilesError`."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise ModelFilesError(f"{path}: unreadable: {error.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFilesError(f"{path}: invalid JSON: {error}") from None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a (config) file."""
    if not path.is_file():
        raise ModelFilesError(f"{path}: missing")
    value = parse_json(path)
    if not isinstance(value, dict):
        raise ModelFilesError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check(value: Any, schema: Schema, source: object) -> None:
    """Raise :class:`ModelFilesError` ``"<source>: <field>: <problem>"`` for the first part of ``value`` that does not
    fit ``schema``."""
    problem = schema.problem(value, "")
    if problem is not None:
        raise ModelFilesError(f"{source}: {problem}")


def _where(field: str) -> str:
    return field or "top level"


def _show(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"


class Schema:
    def problem(self, value: Any, field: str) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Is(Schema):
    types: type | tuple[type, ...]
    description: str

    def problem(self, value: Any, field: str) -> str | None:
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            return f"{_where(field)}: expected {self.description}, got {_show(value)}"
        return None


@dataclass(frozen=True)
class Check(Schema):
    base: Schema
    predicate: Callable[[Any], bool]
    description: str

    def problem(self, value: Any, field: str) -> str | None:
        problem = self.base.problem(value, field)
        if problem is None and not self.predicate(value):
            return f"{_where(field)}: expected {self.description}, got {_show(value)}"
        return problem


@dataclass(frozen=True)
class OneOf(Schema):
    values: tuple[Any, ...]

    def problem(self, value: Any, field: str) -> str | None:
        if isinstance(value, bool) or not any(value == v and type(value) is type(v) for v in self.values):
            return f"{_where(field)}: expected one of {list(self.values)}, got {_show(value)}"
        return None


@dataclass(frozen=True)
class Either(Schema):
    options: tuple[Schema, ...]
    description: str

    def problem(self, value: Any, field: str) -> str | None:
        found = [option.problem(value, field) for option in self.options]
        if None in found:
            return None
        # Name the deepest problem when the value has the shape of one option but a bad part.
        deeper = [p for p in found if not p.startswith(f"{_where(field)}: expected ")]
        return deeper[0] if deeper else f"{_where(field)}: expected {self.description}, got {_show(value)}"


@dataclass(frozen=True)
class ListOf(Schema):
    item: Schema

    def problem(self, value: Any, field: str) -> str | None:
        if not isinstance(value, list):
            return f"{_where(field)}: expected a list, got {_show(value)}"
        return next((p for i, v in enumerate(value) if (p := self.item.problem(v, f"{field}[{i}]"))), None)


@dataclass(frozen=True)
class MapOf(Schema):
    item: Schema

    def problem(self, value: Any, field: str) -> str | None:
        if not isinstance(value, dict):
            return f"{_where(field)}: expected an object, got {_show(value)}"
        return next((p for k, v in value.items() if (p := self.item.problem(v, f"{field}[{k!r}]"))), None)


@dataclass(frozen=True)
class Object(Schema):
    required: Mapping[str, Schema]
    optional: Mapping[str, Schema] = field(default_factory=dict)

    def problem(self, value: Any, field: str) -> str | None:
        if not isinstance(value, dict):
            return f"{_where(field)}: expected an object, got {_show(value)}"
        missing = [key for key in self.required if key not in value]
        if missing:
            return f"{_where(field)}: missing required key{'s' * (len(missing) > 1)} {missing}"
        unknown = sorted(set(value) - set(self.required) - set(self.optional))
        if unknown:
            return f"{_where(field)}: unknown key{'s' * (len(unknown) > 1)} {unknown} (known: {[*self.required, *self.optional]})"
        for key, item in value.items():
            problem = {**self.required, **self.optional}[key].problem(item, f"{field}.{key}" if field else key)
            if problem is not None:
                return problem
        return None


STRING = Is(str, "a string")
NAME = Check(STRING, bool, "a non-empty string")
COUNT = Check(Is(int, "an integer"), lambda v: v >= 0, "a non-negative integer")
POSITIVE = Check(Is(int, "an integer"), lambda v: v > 0, "a positive integer")
OBJECT = Is(dict, "an object")
NOTHING = OneOf((None,))


def nullable(schema: Schema, description: str) -> Either:
    return Either((NOTHING, schema), f"null or {description}")
