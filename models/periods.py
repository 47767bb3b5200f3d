"""Calendar periods (month / quarter / year) in the business timezone (docs/design.md §4).

Quarters and years follow the fiscal year, which starts on the first day of the config's
``fiscal_year_start_month`` (1 = January: the calendar year). A fiscal year is named by the
calendar year it starts in.
"""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

PERIODS = ("month", "quarter", "year")


def _months_from(year: int, month: int, months: int) -> tuple[int, int]:
    """(year, month) ``months`` months after (year, month)."""
    index = year * 12 + month - 1 + months
    return index // 12, index % 12 + 1


def period_bounds(now_ms: int, zone: ZoneInfo, period: str, fiscal_start: int = 1) -> tuple[int, int]:
    """[start, end) of the period containing ``now_ms``, as epoch ms."""
    now = datetime.fromtimestamp(now_ms / 1000, zone)
    if period == "month":
        length, offset = 1, 0
    elif period == "quarter":
        length, offset = 3, (now.month - fiscal_start) % 3
    elif period == "year":
        length, offset = 12, (now.month - fiscal_start) % 12
    else:
        raise ValueError(f"unknown period {period!r}")
    start = _months_from(now.year, now.month, -offset)
    end = _months_from(*start, length)
    # Built through the zone so a DST change inside the period gets the right offsets.
    return (int(datetime(*start, 1, tzinfo=zone).timestamp() * 1000),
            int(datetime(*end, 1, tzinfo=zone).timestamp() * 1000))


def elapsed_ratio(now_ms: int, zone: ZoneInfo, period: str, fiscal_start: int = 1) -> float:
    start, end = period_bounds(now_ms, zone, period, fiscal_start)
    return (now_ms - start) / (end - start)


def period_first_hours(now_ms: int, zone: ZoneInfo, fiscal_start: int = 1) -> tuple[tuple[str, int], ...]:
    """(period, first epoch hour) of each current period: the hour ranges, ending at the
    clock's hour, that the ``_period`` sums add up."""
    return tuple((period, period_bounds(now_ms, zone, period, fiscal_start)[0] // 3_600_000)
                 for period in PERIODS)
