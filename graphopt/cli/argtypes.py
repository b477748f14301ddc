"""argparse types for numbers that must be positive (or not negative) and for runtime lists: a nonsense
value is a usage error naming the flag (rc 2), not a traceback, a silent default or a whole run wasted later."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["positive_int", "non_negative_int", "positive_float", "non_negative_float", "positive_ints", "runtime_list"]


def _number(kind: type, floor: float, strict: bool) -> Callable[[str], int | float]:
    what = f"{'a positive' if strict else 'a non-negative'} {'integer' if kind is int else 'number'}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or (value <= floor if strict else value < floor):  # NaN or out of range
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, strict=True)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)
non_negative_float = _number(float, 0.0, strict=False)


def positive_ints(flag: str) -> Callable[[str], list[int]]:
    """``1,8,32`` -> [1, 8, 32]; anything but positive integers (below 2^63, the largest tensor dim) is a
    usage error; argparse names ``flag`` (``argument --batch-sizes: expected ...``)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if not values or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
        if any(v >= 2**63 for v in values):
            raise argparse.ArgumentTypeError(f"expected sizes below 2^63 (a tensor dim is an int64), got {text!r}")
        return values

    return parse


def runtime_list(text: str) -> list[str]:
    """Known runtime names (an unavailable one is benchmarked as skipped; a misspelt one is refused)."""
    from graphopt.errors import LoweringError
    from graphopt.runtime.backend import check_runtime_name

    try:
        names = [check_runtime_name(r.strip()) for r in text.split(",") if r.strip()]
    except LoweringError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not names:
        raise argparse.ArgumentTypeError("name at least one runtime, e.g. --runtimes eager,inductor")
    return names
