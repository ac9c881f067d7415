"""Small type checkers for untrusted, decoded msgpack values.

Every request argument and every piece of saved VM state passes through
one of these before anything acts on it, so a wrong type, a hostile length
or a missing field is refused with a message that names the field, what
was expected and what was found.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class SchemaError(ValueError):
    """A value did not match its schema; ``str()`` is ``where: what``.

    Containers check their items with an empty path and add their own part
    only when an error passes through, so the success path builds no strings
    (state validation runs inside the guest's pause)."""

    def __init__(self, what: str, where: str = "") -> None:
        super().__init__(f"{where}: {what}" if where else what)
        self.what = what
        self.where = where

    def at(self, prefix: str) -> SchemaError:
        """This error, one level further out (``prefix`` is the container's part)."""
        if not self.where:
            where = prefix
        elif self.where.startswith("[") or not prefix:
            where = prefix + self.where
        else:
            where = f"{prefix}.{self.where}"
        return SchemaError(self.what, where)


def describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class Spec:
    """Checks a value and returns it (possibly normalised)."""

    def check(self, value: Any, path: str) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def fail(self, path: str, expected: str, value: Any) -> SchemaError:
        return SchemaError(f"expected {expected}, found {describe(value)}", path)


@dataclass(frozen=True)
class Int(Spec):
    min: int = 0
    max: int = 2**64 - 1

    def check(self, value: Any, path: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(path, "an integer", value)
        if not self.min <= value <= self.max:
            raise self.fail(path, f"an integer in {self.min}..{self.max}", value)
        return value


@dataclass(frozen=True)
class Float(Spec):
    """A number (integers accepted), finite and in range."""

    min: float = 0.0
    max: float = float(2**64)

    def check(self, value: Any, path: str) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(path, "a number", value)
        if not self.min <= value <= self.max:  # also refuses NaN
            raise self.fail(path, f"a number in {self.min}..{self.max}", value)
        return float(value)


U8 = Int(0, 0xFF)
U32 = Int(0, 0xFFFF_FFFF)
U64 = Int(0, 2**64 - 1)


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "true or false", value)
        return value


@dataclass(frozen=True)
class Str(Spec):
    max_len: int = 256
    pattern: str | None = None
    _regex: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pattern is not None:
            object.__setattr__(self, "_regex", re.compile(self.pattern))

    def check(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, "a string", value)
        if len(value) > self.max_len:
            raise self.fail(path, f"a string of at most {self.max_len} characters", value)
        if self._regex is not None and not self._regex.fullmatch(value):
            raise self.fail(path, f"a string matching {self.pattern}", value)
        return value


NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
Name = Str(max_len=63, pattern=NAME_PATTERN)


@dataclass(frozen=True)
class Bytes(Spec):
    min_len: int = 0
    max_len: int = 1 << 20

    def check(self, value: Any, path: str) -> bytes:
        if not isinstance(value, bytes):
            raise self.fail(path, "binary data", value)
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len == self.max_len:
                want = f"exactly {self.max_len} bytes"
            else:
                want = f"{self.min_len}..{self.max_len} bytes"
            raise SchemaError(f"expected {want}, found {len(value)} bytes", path)
        return value


@dataclass(frozen=True)
class ListOf(Spec):
    item: Spec
    max_len: int = 1024
    min_len: int = 0

    def check(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, "a list", value)
        if not self.min_len <= len(value) <= self.max_len:
            raise SchemaError(
                f"expected {self.min_len}..{self.max_len} items, found {len(value)}", path
            )
        check = self.item.check
        out = []
        for i, v in enumerate(value):
            try:
                out.append(check(v, ""))
            except SchemaError as e:
                raise e.at(f"{path}[{i}]") from None
        return out


@dataclass(frozen=True)
class AnyMap(Spec):
    max_len: int = 1024

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "a map", value)
        if len(value) > self.max_len:
            raise SchemaError(f"expected at most {self.max_len} keys, found {len(value)}", path)
        return value


@dataclass(frozen=True)
class OneOf(Spec):
    choices: tuple[Any, ...]

    def check(self, value: Any, path: str) -> Any:
        if not any(type(value) is type(c) and value == c for c in self.choices):
            names = ", ".join(repr(c) for c in self.choices)
            raise self.fail(path, f"one of {names}", value)
        return value


@dataclass(frozen=True)
class Nullable(Spec):
    """``spec`` or nil (msgpack None)."""

    spec: Spec

    def check(self, value: Any, path: str) -> Any:
        return None if value is None else self.spec.check(value, path)


@dataclass(frozen=True)
class Field:
    """One key of a record: its spec, and a default that makes it optional."""

    spec: Spec
    default: Any = ...
    factory: Callable[[], Any] | None = None

    @property
    def required(self) -> bool:
        return self.default is ... and self.factory is None

    def fallback(self) -> Any:
        return self.factory() if self.factory is not None else self.default


@dataclass(frozen=True)
class Record(Spec):
    """A map with known keys. Unknown keys are refused unless ``open``."""

    fields: dict[str, Field]
    open: bool = False

    def check(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, "a map", value)
        if not self.open:
            unknown = [k for k in value if k not in self.fields]
            if unknown:
                raise SchemaError(f"unknown key {unknown[0]!r}", path)
        out: dict[str, Any] = {}
        for key, fld in self.fields.items():
            if key in value:
                try:
                    out[key] = fld.spec.check(value[key], "")
                except SchemaError as e:
                    raise e.at(key).at(path) from None
            elif fld.required:
                raise SchemaError("required but missing", key).at(path)
            else:
                out[key] = fld.fallback()
        return out


def record(open: bool = False, **fields: Spec | Field) -> Record:
    """Shorthand: ``record(vm=Name, size=Field(U64, 0))``."""
    return Record(
        {k: v if isinstance(v, Field) else Field(v) for k, v in fields.items()}, open=open
    )


def optional(spec: Spec, default: Any = None) -> Field:
    return Field(spec, default)
