"""Argument checks shared by every module. Each returns the value it accepts and raises ValueError
with one line naming the argument, what it must be and what it got. Nothing here imports the
rest of seedslot, so every module may use it."""

from __future__ import annotations

import math

__all__ = ["check_choice", "check_int", "check_float"]


def check_choice(name: str, value, accepted):
    """``value`` if it is one of ``accepted``; ValueError naming ``name`` and listing them otherwise."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")
    return value


def check_int(name: str, value, minimum: int = 0, *, optional: bool = False):
    """``value`` if it is an int (not a bool) >= ``minimum`` (or, with ``optional``, None);
    ValueError naming ``name`` otherwise."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}; got {value!r}")
    return value


def check_float(name: str, value, lo: float, hi: float = math.inf, *, lo_open: bool = False,
                hi_open: bool = True) -> float:
    """``float(value)`` if it is a finite int or float (not a bool) in the interval from ``lo`` to
    ``hi`` (each end open or closed as told; by default ``[lo, hi)``); ValueError otherwise."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must be a finite number in {lo_b}{lo}, {hi}{hi_b}; got {value!r}")
    return float(value)
