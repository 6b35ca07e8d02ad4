"""Duration strings (``500ms``, ``30s``, ``5m``, ``1h``, ``7d``) and plain numbers of seconds."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")

NANOS_PER_SECOND = 1_000_000_000

_RFC3339_FRACTION = re.compile(r"\.(\d+)")


def parse_server_time(value: object) -> datetime | None:
    """Parse the server's RFC 3339 timestamp (nanoseconds, ``Z``) into an aware datetime.

    Return ``None`` for anything else: the value comes from the wire.
    """
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    # Python 3.10's fromisoformat accepts only 3 or 6 fraction digits; the server sends 9.
    text = _RFC3339_FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def parse_duration(value: object) -> float:
    """Return ``value`` in seconds; numbers are seconds, strings take a unit suffix.

    Raise ``ValueError`` with a message that shows the accepted forms.
    """
    if isinstance(value, bool):  # bool is an int; True seconds is never what was meant
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        if not match:
            raise ValueError(
                f"{value!r} is not a duration; write a number of seconds or a string such as "
                "'500ms', '30s', '5m', '1h' or '7d'"
            )
        number, unit = match.groups()
        seconds = float(number) * _UNITS[unit or "s"]
    else:
        raise ValueError(f"{value!r} is not a duration")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} must be a finite, non-negative duration")
    return seconds


def to_nanos(seconds: float) -> int:
    """Convert seconds to the integer nanoseconds the JetStream API expects."""
    return round(seconds * NANOS_PER_SECOND)


def format_duration(seconds: float) -> str:
    """Render seconds the way a user would write them in settings."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_age(seconds: float) -> str:
    """Render an elapsed time for humans in at most two adjacent units: ``45s``, ``3m12s``."""
    whole = max(0, int(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for index, (unit, size) in enumerate(units):
        if whole >= size or unit == "s":
            text = f"{whole // size}{unit}"
            if unit != "s":
                next_unit, next_size = units[index + 1]
                rest = (whole % size) // next_size
                if rest:
                    text += f"{rest}{next_unit}"
            return text
    raise AssertionError("unreachable")
