"""One typed option class for passes and runtimes.

A pass declares ``options = (Option("ratio", float, 0.3, "share of heads to remove"),)``;
a runtime declares its lowering and runner options the same way. Values come
from pipeline text, the CLI (``--runtime-option k=v``) or Python keywords and are
coerced to the declared type; a bad value is one line naming where it was
given, the option, what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from graphopt.errors import GraphoptError, PassOptionError, closest

__all__ = ["Option", "resolve_options"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    """One typed option. ``type`` is bool, int, float, str or list (a tuple of str).

    ``choices`` restricts the values (every item, for a list); ``check``
    returns a reason string when a typed value is invalid. An option whose
    default is None accepts None ("not set").
    """

    name: str
    type: type
    default: Any
    help: str = ""
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None

    def coerce(self, value: Any, where: str, error: type[GraphoptError] = PassOptionError) -> Any:
        """``value`` as this option's type; ``where`` starts the message
        (``pass 'cast'``, ``onnxruntime | lower``)."""
        if value is None and self.default is None:
            return None
        at = f"{where} option '{self.name}'"
        try:
            typed = self._convert(value)
        except (TypeError, ValueError):
            raise error(f"{at}: expected {self.type_name()}, got {value!r}") from None
        if self.choices is not None:
            bad = [v for v in (typed if self.type is list else [typed]) if v not in self.choices]
            if bad:
                raise error(
                    f"{at}: {bad[0]!r} is not one of {', '.join(map(str, self.choices))}"
                    f"{closest(str(bad[0]), [str(c) for c in self.choices])}"
                )
        if self.check is not None:
            reason = self.check(typed)
            if reason:
                raise error(f"{at}: {reason}")
        return typed

    def _convert(self, value: Any) -> Any:
        t = self.type
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE:
                return True
            if isinstance(value, str) and value.lower() in _FALSE:
                return False
            raise ValueError(value)
        if t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError(value)
            f = float(value)
            if not math.isfinite(f):
                raise ValueError(value)
            return f
        if t is list:
            if isinstance(value, str):
                return tuple(v for v in value.split(",") if v)
            if isinstance(value, (list, tuple)):
                return tuple(str(v) for v in value)
            raise TypeError(value)
        if t is str:
            if not isinstance(value, str):
                raise TypeError(value)
            return value
        raise TypeError(f"unsupported option type {t}")

    def format(self, value: Any) -> str:
        """The value as pipeline/CLI text (``parse(format(v)) == v``)."""
        if self.type is bool:
            return "true" if value else "false"
        if self.type is list:
            return ",".join(value) if value else ""
        return str(value)

    def type_name(self) -> str:
        if self.choices:
            return "one of " + "|".join(map(str, self.choices))
        return {bool: "bool (true or false)", int: "an integer", float: "a number", str: "a word",
                list: "a comma-separated list"}[self.type]


def resolve_options(
    declared: Sequence[Option], given: Mapping[str, Any], where: str, error: type[GraphoptError]
) -> dict[str, Any]:
    """Every declared option's value: ``given`` coerced, defaults for the rest;
    an unknown key is an error naming the options there are."""
    known = {o.name: o for o in declared}
    for key in given:
        if key not in known:
            names = ", ".join(known) or "none"
            raise error(f"{where}: unknown option '{key}'{closest(key, list(known))}; options: {names}")
    return {name: opt.coerce(given.get(name, opt.default), where, error) for name, opt in known.items()}
