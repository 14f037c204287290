"""Times in logs and on the command line: parsing ``timestamp`` fields and ``--since``/``--until``.

Kept apart from the aggregation so that every command (summarize, query, tail, trace)
reads and prints times the same way: UTC, microseconds, a ``Z`` suffix, so that strings
sort as times.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

# Sentinels for "no timestamp yet": compared by identity, so a real time never matches.
FAR_PAST = datetime.min.replace(tzinfo=UTC)
FAR_FUTURE = datetime.max.replace(tzinfo=UTC)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND = timedelta(seconds=1)

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_timestamp(value: object) -> datetime | None:
    """An aware datetime from an ISO 8601 string (no zone: UTC), or ``None``."""
    if type(value) is not str:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed


def epoch_second(when: datetime) -> int:
    """Whole seconds since the Unix epoch (floor) of an aware datetime, exactly (no float)."""
    return (when - _EPOCH) // _SECOND


def parse_time_arg(text: str, *, now: datetime | None = None) -> datetime:
    """Parse a ``--since``/``--until`` value: ISO 8601, or a duration before ``now``.

    Raises :class:`argparse.ArgumentTypeError` with the accepted forms on bad input.
    """
    match = _RELATIVE.match(text)
    if match is not None:
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    parsed = parse_timestamp(text.strip())
    if parsed is None:
        raise argparse.ArgumentTypeError(
            f"invalid time {text!r}: use ISO 8601 (2026-11-28T14:00:00Z) "
            "or a duration before now (90s, 30m, 1h, 2d, 1w)"
        )
    return parsed


def format_time(value: datetime | None) -> str | None:
    """``2026-11-28T14:03:58.123456Z``: UTC, microseconds, so strings sort as times."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError:  # within hours of year 1 or 9999: keep its own offset
        return value.isoformat()


def format_span(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.3f}s"
    whole = int(seconds)
    days, rem = divmod(whole, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    text = f"{hours}h{minutes:02d}m{secs:02d}s" if hours or days else f"{minutes}m{secs:02d}s"
    return f"{days}d{text}" if days else text
