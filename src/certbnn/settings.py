"""Typed settings: one schema, read off a dataclass's fields and type hints, checks every value.

Every source of settings (TOML files, CLI flags, ``--set`` / ``--eval-set`` / ``--opt`` /
``--lik-opt``, saved ``config.json``, option tables) goes through :func:`check_settings`
before any work starts. The rules are strict, so a value is never silently misread:

* ``bool`` accepts only ``true`` / ``false`` (not ``"no"``, not ``1``);
* ``int`` accepts only integers (not ``true``, not ``100.5``);
* ``float`` accepts integers and floats, and only finite ones (no ``nan`` / ``inf``:
  results are written as strict JSON);
* ``str`` accepts only strings; ``X | None`` also accepts ``None``;
* ``list[X]`` accepts a list of X, or one X (a one-element list), or a comma-separated
  string of X (the CLI's spelling: ``attacks=fgsm,pgd``); ``tuple[X, Y]`` a list of two;
* ``dict[...]`` / ``Mapping[...]`` accept a table.

A class declares value ranges in a ``SETTING_RANGES`` class variable mapping field
names to :class:`Range` (applied to every element of a list), and optionally longer
names for messages in ``SETTING_LABELS``. Errors are one
:class:`~certbnn.errors.ConfigError` line naming the key, what was expected and the value.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from certbnn.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """An interval (``None`` end: unbounded) and/or a set of allowed values."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def text(self) -> str:
        if self.choices is not None:
            names = [str(c) for c in self.choices]
            return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def at_least(low: float) -> Range:
    return Range(low=low)


def positive() -> Range:
    return Range(low=0, low_open=True)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low=low, high=high, low_open=low_open, high_open=high_open)


def one_of(*choices: Any) -> Range:
    return Range(choices=tuple(choices))


SEED = between(0, 2**63 - 1)  # torch / numpy generators accept these (offsets per rank / epoch stay < 2**64)
UNIT = between(0, 1)  # pixel radii (inputs are scaled to [0, 1]) and probabilities
MILLION = 10**6  # upper bound of counts that cost time or memory linearly (epochs, samples, steps)
LAM_LABEL = {"lam": "lam (lambda, the weight of the clean term)"}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Init fields of dataclass ``cls`` -> resolved type hint."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def check_settings(
    cls: type, values: Mapping[str, Any], *, where: str = "", exclude: Iterable[str] = (), what: str = "setting"
) -> dict[str, Any]:
    """``values`` checked against the fields of dataclass ``cls`` (minus ``exclude``) and its
    ``SETTING_RANGES``; returns them normalised (ints as floats where a float is expected,
    one value or a comma-separated string as a list). ``where`` prefixes every message."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}expected a table of {what}s, got {_show(values)}")
    excluded = set(exclude)
    types_ = {k: v for k, v in field_types(cls).items() if k not in excluded}
    unknown = sorted(str(k) for k in values if k not in types_)
    if unknown:
        known = ", ".join(sorted(types_)) or "none"
        raise ConfigError(f"{where}unknown {what}(s) {', '.join(unknown)} (known: {known})")
    ranges, labels = getattr(cls, "SETTING_RANGES", {}), getattr(cls, "SETTING_LABELS", {})
    return {
        key: check_value(labels.get(key, key), value, types_[key], ranges.get(key), where=where)
        for key, value in values.items()
    }


def check_value(key: str, value: Any, hint: Any, bound: Range | None = None, *, where: str = "") -> Any:
    """``value`` converted to type ``hint`` and checked against ``bound`` (see module doc)."""
    ok, converted = _convert(value, hint, bound)
    if not ok:
        raise ConfigError(f"{where}{key} must be {_expected(hint, bound)}, got {_show(value)}")
    return converted


def _expected(hint: Any, bound: Range | None) -> str:
    if _is_union(hint):
        args = typing.get_args(hint)
        parts = [_expected(a, bound) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or none" if type(None) in args else "")
    if bound is None:
        return describe(hint)
    if bound.choices is not None and not _is_list(hint):
        return bound.text()
    return f"{describe(hint)} (each {bound.text()})" if _is_list(hint) else f"{bound.text()} ({describe(hint)})"


def describe(hint: Any) -> str:
    """English for a type hint: 'an integer', 'a finite number or none', 'a list of strings'."""
    args = typing.get_args(hint)
    if _is_union(hint):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or none" if type(None) in args else "")
    origin = typing.get_origin(hint)
    if origin is list:
        return f"a list of {_plural(describe(args[0]))}" if args else "a list"
    if origin is tuple:
        return f"a list of {len(args)} {_plural(describe(args[0]))}" if args else "a list"
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, f"a {getattr(hint, '__name__', hint)}"
    )


def _plural(text: str) -> str:
    return {
        "an integer": "integers",
        "a finite number": "finite numbers",
        "a string": "strings",
        "true or false": "booleans",
    }.get(text, text)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_list(hint: Any) -> bool:
    if _is_union(hint):
        return any(_is_list(a) for a in typing.get_args(hint))
    return typing.get_origin(hint) in (list, tuple)


def _convert(value: Any, hint: Any, bound: Range | None) -> tuple[bool, Any]:
    if hint is Any:
        return True, value
    if _is_union(hint):
        for member in typing.get_args(hint):
            ok, converted = _convert(value, member, bound)
            if ok:
                return True, converted
        return False, None
    if hint is type(None):
        return value is None, None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return _convert_list(value, args[0] if args else Any, bound)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            return False, None
        items = [_convert(v, a, bound) for v, a in zip(value, args or [Any] * len(value))]
        return all(ok for ok, _ in items), tuple(v for _, v in items)
    if origin in (dict, collections.abc.Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            return False, None
        if len(args) == 2:
            items = {k: _convert(v, args[1], None) for k, v in value.items()}
            return all(isinstance(k, str) and ok for k, (ok, _) in items.items()), {k: v for k, (_, v) in items.items()}
        return True, dict(value)
    ok, converted = _scalar(value, hint)
    return (ok and (bound is None or bound.contains(converted))), converted


def _scalar(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:  # and within int64, what torch and numpy take
        return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63, value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            return ok and math.isfinite(value), float(value) if ok else None
        except OverflowError:  # an int beyond float range
            return False, None
    if hint is str:
        return isinstance(value, str), value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value


def _convert_list(value: Any, item: Any, bound: Range | None) -> tuple[bool, Any]:
    if isinstance(value, str):  # "a,b": two items; "" none; an empty item ("a,,b") is refused
        parts = [t.strip() for t in value.split(",")] if value.strip() else []
        if any(not t for t in parts):
            return False, None
        value = [_parse_text(t, item) for t in parts]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    items = [_convert(v, item, bound) for v in value]
    return all(ok for ok, _ in items), [v for _, v in items]


def _parse_text(text: str, hint: Any) -> Any:
    """One comma-separated item of a list given as text, as the item type (unchanged when unparsable)."""
    try:
        if hint is float:
            return float(text)
        if hint is int:
            return int(text)
    except ValueError:
        pass
    return text


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
