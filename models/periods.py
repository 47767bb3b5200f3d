"""Calendar periods (month / quarter / year) in the business timezone (docs/design.md §4)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

PERIODS = ("month", "quarter", "year")


def period_bounds(now_ms: int, zone: ZoneInfo, period: str) -> tuple[int, int]:
    """[start, end) of the calendar period containing ``now_ms``, as epoch ms."""
    now = datetime.fromtimestamp(now_ms / 1000, zone)
    if period == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    elif period == "quarter":
        first = (now.month - 1) // 3 * 3 + 1
        start = now.replace(month=first, day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + (first == 10), month=(first + 2) % 12 + 1)
    elif period == "year":
        start = now.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        end = start.replace(year=start.year + 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    # Rebuild through the zone so a DST change inside the period gets the right offsets.
    start = datetime(start.year, start.month, 1, tzinfo=zone)
    end = datetime(end.year, end.month, 1, tzinfo=zone)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def elapsed_ratio(now_ms: int, zone: ZoneInfo, period: str) -> float:
    start, end = period_bounds(now_ms, zone, period)
    return (now_ms - start) / (end - start)
