"""Dated exchange rates to the reporting currency (docs/kpis.md, "Reporting currency").

An entry ``(date, currency, rate)`` says that from that date on one unit of the currency is
``rate`` units of the reporting currency; the rate in force on a date is the latest entry on or
before it, as Salesforce's dated exchange rates. Rates are kept as exact fractions of their
decimal text, so a converted sum is exact until it is rounded once, at export.

Two sources: a CSV file read at start-up (a bad row stops the worker, naming file:line) and a
compacted topic another service writes (key ``CUR:YYYY-MM-DD``, value the rate as text), whose
entries override and extend the file's. :class:`RateBook` swaps in a new table per batch of
topic records, so a scrape reads one consistent table without locks.
"""

from __future__ import annotations

import bisect
import csv
import functools
import re
from collections.abc import Callable, Iterable
from datetime import date, datetime
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

from models.config import DEFAULT_CONFIG, ConfigError, FunnelConfig

_CURRENCY = re.compile(r"^[A-Z]{3}$")
Key = tuple[str, int]  # (currency, date ordinal)


class RatesError(ConfigError):
    """A rate that cannot be used; the message names where it came from."""


def parse_rate(currency: str, day: str, rate: str) -> tuple[Key, Fraction]:
    """One entry from text; ``ValueError`` with a one-line reason when it is not usable."""
    currency = currency.strip()
    if not _CURRENCY.match(currency):
        raise ValueError(f"currency {currency!r} is not an ISO 4217 code")
    try:
        ordinal = date.fromisoformat(day.strip()).toordinal()
    except ValueError:
        raise ValueError(f"date {day.strip()!r} is not YYYY-MM-DD") from None
    try:
        value = Fraction(rate.strip())
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"rate {rate.strip()!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"rate {rate.strip()} must be positive")
    return (currency, ordinal), value


def load_rates_file(path: Path) -> dict[Key, Fraction]:
    """The entries of a ``date,currency,rate`` CSV (a header line is allowed); a missing file or
    a bad row raises :class:`RatesError` naming ``file:line``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RatesError(f"cannot read rates file {path}: {exc.strerror}") from None
    entries: dict[Key, Fraction] = {}
    for line, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if line == 1 and row[0].strip().lower() == "date":
            continue
        try:
            if len(row) != 3:
                raise ValueError(f"expected date,currency,rate, got {len(row)} fields")
            key, rate = parse_rate(row[1], row[0], row[2])
        except ValueError as exc:
            raise RatesError(f"{path}:{line}: {exc}") from None
        entries[key] = rate
    return entries


def parse_topic_record(key: bytes | None, value: bytes | None) -> tuple[Key, Fraction | None]:
    """A record of the rates topic: ``CUR:YYYY-MM-DD`` → rate text; a tombstone (no value)
    gives ``None`` (the entry is withdrawn). ``ValueError`` when it cannot be read."""
    if key is None:
        raise ValueError("record without a key")
    currency, _, day = key.decode("utf-8", "replace").partition(":")
    if value is None:
        entry, _ = parse_rate(currency, day, "1")
        return entry, None
    return parse_rate(currency, day, value.decode("utf-8", "replace"))


class RateTable:
    """Per currency, dates in order and the rate from each date on (immutable once built)."""

    def __init__(self, entries: dict[Key, Fraction]) -> None:
        by_currency: dict[str, list[tuple[int, Fraction]]] = {}
        for (currency, ordinal), rate in sorted(entries.items()):
            by_currency.setdefault(currency, []).append((ordinal, rate))
        self._days = {cur: [day for day, _ in rows] for cur, rows in by_currency.items()}
        self._rates = {cur: [rate for _, rate in rows] for cur, rows in by_currency.items()}

    @property
    def currencies(self) -> list[str]:
        return sorted(self._days)

    def rate_on(self, currency: str, ordinal: int) -> Fraction | None:
        """The rate in force on the day ``ordinal`` (``date.toordinal()``); ``None`` when the
        currency has no entry on or before it."""
        days = self._days.get(currency)
        if not days:
            return None
        index = bisect.bisect_right(days, ordinal) - 1
        return self._rates[currency][index] if index >= 0 else None


class RateBook:
    """The file's entries with the topic's on top; :attr:`table` is replaced, never changed."""

    def __init__(self, file_entries: dict[Key, Fraction] | None = None) -> None:
        self._file = dict(file_entries or {})
        self._topic: dict[Key, Fraction] = {}
        self.table = RateTable(self._file)

    def apply(self, records: list[tuple[Key, Fraction | None]]) -> None:
        """Topic entries (``None``: withdrawn, the file's entry if any applies again)."""
        for key, rate in records:
            if rate is None:
                self._topic.pop(key, None)
            else:
                self._topic[key] = rate
        self.table = RateTable({**self._file, **self._topic})


def load_book(file: Path | None, config_path: Path | None) -> RateBook:
    """The book of the funnel config's ``rates.file`` (relative to the config file's folder)."""
    if file is None:
        return RateBook()
    if not file.is_absolute() and config_path is not None:
        file = Path(config_path).parent / file
    return RateBook(load_rates_file(file))


# ------------------------------------------------------------------ conversion
ALL_TIME = ("all", float("-inf"), float("inf"))  # a range of every hour, future closes included
Bucket = tuple[tuple, str, int, int]  # (labels, currency, hour, micro units)


@functools.lru_cache(maxsize=1 << 16)
def day_of_hour(hour: int, zone: ZoneInfo) -> int:
    """The date (ordinal) the hour ``hour`` (epoch hours) starts on in the business timezone."""
    return datetime.fromtimestamp(hour * 3600, zone).date().toordinal()


def convert(buckets: Iterable[Bucket], rate_at: Callable[[str, int], Fraction | None],
            ranges: Iterable[tuple[str, float, float]]) -> tuple[dict[str, dict[tuple, Fraction]],
                                                                  dict[tuple, int]]:
    """Each bucket's amount at the rate ``rate_at(currency, hour)`` gives for its hour, summed
    per range ``(name, first hour, last hour)`` and labels, exactly (micro units × rate, rounded
    by the caller once); buckets without a rate are left out of every sum and returned as
    ``unconverted[(labels, currency)]`` (native micro units, all hours)."""
    ranges = tuple(ranges)
    by_rate: dict[tuple[str, tuple], dict[Fraction, int]] = {}
    unconverted: dict[tuple, int] = {}
    rates: dict[tuple[str, int], Fraction | None] = {}
    for labels, currency, hour, micro in buckets:
        key = (currency, hour)
        rate = rates[key] if key in rates else rates.setdefault(key, rate_at(currency, hour))
        if rate is None:
            unconverted[(labels, currency)] = unconverted.get((labels, currency), 0) + micro
            continue
        for name, first, last in ranges:
            if first <= hour <= last:
                sums = by_rate.setdefault((name, labels), {})
                sums[rate] = sums.get(rate, 0) + micro
    converted: dict[str, dict[tuple, Fraction]] = {name: {} for name, _, _ in ranges}
    for (name, labels), sums in by_rate.items():
        converted[name][labels] = sum((rate * micro for rate, micro in sums.items()), Fraction(0))
    return converted, unconverted


def rate_lookup(table: RateTable, reporting: str, zone: ZoneInfo) -> Callable[[str, int], Fraction | None]:
    """``rate_at(currency, hour)``: the reporting currency at 1, others at the rate in force on
    the hour's date in the business timezone."""
    one = Fraction(1)

    def rate_at(currency: str, hour: int) -> Fraction | None:
        return one if currency == reporting else table.rate_on(currency, day_of_hour(hour, zone))
    return rate_at


def reporting_book(config: FunnelConfig, config_path: Path | None) -> RateBook | None:
    """The worker's rates (``None`` without a reporting currency); :class:`RatesError` when the
    file cannot be used."""
    if not config.reporting_currency:
        return None
    return load_book(config.rates.file, config_path or DEFAULT_CONFIG)
