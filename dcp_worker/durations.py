"""Durations as people write them: shown (``45s``, ``3m05s``, ``2h10m``) and read (``30m``)."""

from __future__ import annotations

__all__ = ["duration", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(seconds: float, tenths_below: float = 0.0) -> str:
    """``45s``, ``3m05s``, ``2h10m``; below ``tenths_below`` seconds, ``1.4s``."""
    if seconds < tenths_below:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d`` or ``1h30m`` in seconds.

    Raises:
        ValueError: not such a duration, or not positive.
    """
    total, number = 0.0, ""
    for ch in text.strip().lower():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in _UNITS and number:
            total += float(number) * _UNITS[ch]
            number = ""
        else:
            raise ValueError(f"{text!r} is not a duration (like 90s, 30m, 2h, 1h30m)")
    if number:
        total += float(number)
    if total <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return total
