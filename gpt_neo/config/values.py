"""One JSON value against the type its key declares: the coercion every key of a model config
and of `moe_params` goes through. Booleans take true/false (or 0/1), integers refuse floats with
a fraction and booleans, numbers take integers, lists become tuples, and a `Literal` type takes
one of its strings (`closest` suggests the nearest when it is not). Callers word the errors.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def unwrap_optional(tp) -> tuple[object, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(tp))
    return tp, False


def allowed(tp) -> tuple[str, ...] | None:
    """The strings a `Literal` type allows; None for any other type."""
    return typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None


def type_name(tp) -> str:
    """How errors name a type: "an integer", "a number or null", "a list of integers"..."""
    inner, nullable = unwrap_optional(tp)
    if nullable:
        return type_name(inner) + " or null"
    if allowed(tp) is not None:
        return "a string"
    if tp in _NAMES:
        return _NAMES[tp]
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[0] is int:
        return "a list of integers"
    return "a list"


def convert(value, tp) -> tuple[bool, object]:
    """(whether `value` is of type `tp`, the value as that type). `tp` is not optional; a
    `Literal` checks the kind (a string) only: see `closest` for its members."""
    if allowed(tp) is not None:
        return isinstance(value, str), value
    if tp is bool:
        ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
        return ok, bool(value) if ok else value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if tp is str:
        return isinstance(value, str), value
    if typing.get_origin(tp) is tuple:
        element = typing.get_args(tp)[0]
        ok = isinstance(value, list) and all(
            isinstance(v, element) and not isinstance(v, bool) for v in value
        )
        return ok, tuple(value) if ok else value
    raise TypeError(f"no coercion for {tp}")


def closest(value: str, choices: Sequence[str]) -> str:
    """` Did you mean 'x'?` for the choice nearest `value`, or ''."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""
