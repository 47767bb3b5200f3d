"""Sums of the hourly families over ranges of hours (rolling windows, calendar periods), and
the histograms they add up.

An hourly family is keyed by (labels..., hour): as many keys as hours of history. A scrape
reads per-range sums that each partition's :class:`~models.fold.Fold` keeps up to date
(:class:`HourlySums`), instead of every hour bucket.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import TYPE_CHECKING

from models.aggregates import HISTOGRAMS

if TYPE_CHECKING:
    from models.fold import Fold

_bisect_left = bisect.bisect_left


class Hist:
    """Bucket counts (non-cumulative, last is +Inf), count and sum, in integer units."""

    __slots__ = ("count", "counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.count = 0
        self.total = 0

    def add(self, other: Hist) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.count += other.count
        self.total += other.total

    def observe(self, bounds: list[int], value: int, sign: int) -> None:
        self.counts[_bisect_left(bounds, value)] += sign
        self.count += sign
        self.total += sign * value


def hist_of(hists: dict, key: tuple, size: int) -> Hist:
    """``hists[key]``, created empty with ``size`` buckets when missing."""
    hist = hists.get(key)
    if hist is None:
        hist = hists[key] = Hist(size)
    return hist


class HourlySums:
    """One hourly family summed over ranges of hours that all end at ``now_hour``: per range
    name, labels → total (counters) or :class:`Hist` (:attr:`sums`). A range is (name, first
    hour included); a bucket counts when first ≤ its hour ≤ now_hour. :meth:`Fold.hourly_sums`
    keeps one per family up to date as deals change, so a scrape reads sums instead of every
    hour bucket.

    Kept as one cell per labels holding every range's total (one dict look-up per update, not
    two per range: this runs for most items a deal contributes). :attr:`sums` reads them out as
    the dicts they were: a zero total is absent, and so is a histogram whose count fell to
    zero (it starts afresh when observed again)."""

    __slots__ = ("_cells", "_first", "_names", "_slots", "now_hour", "ranges")

    def __init__(self, ranges: tuple[tuple[str, int], ...], now_hour: int) -> None:
        self.ranges = ranges
        self.now_hour = now_hour
        self._names = list(dict.fromkeys(name for name, _ in ranges))
        # (first hour, index of its name) per range, in order: what add/observe walk.
        self._slots = tuple((first, self._names.index(name)) for name, first in ranges)
        # Buckets before this hour are in no range (most of a replay's or backfill's).
        self._first = min((first for _, first in ranges), default=now_hour + 1)
        # labels → per range name, its total (int) or histogram (None: none).
        self._cells: dict[tuple, list] = {}

    @property
    def sums(self) -> dict[str, dict]:
        """Per range name, labels → total (counters, none zero) or :class:`Hist`."""
        sums: dict[str, dict] = {name: {} for name in self._names}
        targets = list(sums.values())
        for labels, cell in self._cells.items():
            for target, value in zip(targets, cell, strict=True):
                if value.__class__ is Hist or value:
                    target[labels] = value
        return sums

    def _cell(self, labels: tuple, empty: object) -> list:
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = [empty] * len(self._names)
        return cell

    def add(self, key: tuple, value: int) -> None:
        hour = key[-1]
        if hour > self.now_hour or hour < self._first:
            return
        cell = self._cell(key[:-1], 0)
        for first, slot in self._slots:
            if hour >= first:
                cell[slot] += value

    def observe(self, key: tuple, bounds: list[int], value: int, sign: int) -> None:
        hour = key[-1]
        if hour > self.now_hour or hour < self._first:
            return
        cell = self._cell(key[:-1], None)
        index = _bisect_left(bounds, value)
        for first, slot in self._slots:
            if hour >= first:
                hist = cell[slot]
                if hist is None:
                    hist = cell[slot] = Hist(len(bounds) + 1)
                hist.counts[index] += sign
                hist.count += sign
                hist.total += sign * value
                if hist.count == 0:
                    cell[slot] = None

    def add_hist(self, key: tuple, other: Hist) -> None:
        hour = key[-1]
        if hour > self.now_hour or hour < self._first:
            return
        cell = self._cell(key[:-1], None)
        for first, slot in self._slots:
            if hour >= first:
                hist = cell[slot]
                if hist is None:
                    hist = cell[slot] = Hist(len(other.counts))
                hist.add(other)


def hourly_totals(folds: Iterable[Fold], family: str, ranges: tuple[tuple[str, int], ...],
                  now_hour: int) -> dict[str, dict]:
    """:meth:`Fold.hourly_sums` of several partitions added up, per range name."""
    totals: dict[str, dict] = {name: {} for name, _ in ranges}
    is_hist = family in HISTOGRAMS
    for fold in folds:
        for name, part in fold.hourly_sums(family, ranges, now_hour).items():
            target = totals[name]
            for labels, value in part.items():
                if is_hist:
                    hist_of(target, labels, len(value.counts)).add(value)
                else:
                    target[labels] = target.get(labels, 0) + value
    return totals
