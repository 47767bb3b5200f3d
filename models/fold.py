"""The fold of a partition: the sum of its deals' contributions (see :mod:`models.aggregates`)."""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterable, Iterator

from models.aggregates import ACCOUNTS, BUCKETS, HISTOGRAMS, OPEN_DEALS, Contribution, Item
from models.hourly import Hist, HourlySums, hist_of

_bisect_left = bisect.bisect_left
_COUNTER = 0
_HISTOGRAM = 1
_OPEN_DEALS = 2
_ACCOUNTS = 3
# Family → how Fold.apply folds it: histograms → their bounds, the two indexes → a number;
# counters are not listed.
_KIND: dict[str, list[int] | int] = {**BUCKETS, OPEN_DEALS: _OPEN_DEALS, ACCOUNTS: _ACCOUNTS}


# An open deal in the index: entered ms, expected close ms (NO_DATE: none), amount in micro
# units (a double holds every to_micro() result exactly) and whether its stall was alerted.
OPEN_DEAL = struct.Struct("<qqd?")
ALERTED_BYTE = OPEN_DEAL.size - 1
NO_DATE = -(2**63)


def stalled_before(now_ms: int, stall_after: float | None) -> float:
    """A deal that entered its stage before this (ms) is stalled at ``now_ms``; no deal is when
    the stage has no ``stall_after``. Tick alerts and scrape gauges both ask this."""
    return NO_DATE if stall_after is None else now_ms - stall_after * 1000


class Fold:
    """Sum of contributions: ``counters[family][key]``, ``hists[family][key]``, and two indexes
    with one entry per open deal and per customer (``accounts``), kept per partition and never
    merged: they are as big as the tables.

    Open deals are grouped ``open_deals[(pipeline, stage, currency, forecast category)]
    [deal_id]`` with the rest packed in 25 bytes (:data:`OPEN_DEAL`): ~170 B a deal, where a
    dict keyed by the whole 7-tuple took ~340 B (bench: RSS per open deal)."""

    __slots__ = ("_routes", "accounts", "counters", "hists", "hourly", "open_deals")

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple, int]] = {}
        self.hists: dict[str, dict[tuple, Hist]] = {}
        self.open_deals: dict[tuple[str, str, str, str], dict[str, bytes]] = {}
        self.accounts: dict[tuple, int] = {}
        # Hourly family → range names → the sums last asked for (kept up to date by apply).
        self.hourly: dict[str, dict[tuple[str, ...], HourlySums]] = {}
        # Family → where apply folds its items (see _route).
        self._routes: dict[str, tuple] = {}

    def apply(self, contribution: Iterable[Item], sign: int) -> None:
        # Runs for every item of every written deal: one look-up finds where an item goes.
        routes = self._routes
        for family, key, value in contribution:
            route = routes.get(family)
            if route is None:
                route = _route(self, family)
            kind, values, views, bounds = route
            if kind == _COUNTER:
                value *= sign
                total = values.get(key, 0) + value
                if total:
                    values[key] = total
                else:
                    values.pop(key, None)
                if views:
                    for sums in views.values():
                        sums.add(key, value)
            elif kind == _HISTOGRAM:
                hist = values.get(key)
                if hist is None:
                    hist = values[key] = Hist(len(bounds) + 1)
                hist.observe(bounds, value, sign)
                if hist.count == 0:
                    del values[key]
                if views:
                    for sums in views.values():
                        sums.observe(key, bounds, value, sign)
            elif kind == _OPEN_DEALS:
                pl, stage, currency, entered, deal_id, alerted, expected, category = key
                group_key = (pl, stage, currency, category)
                group = self.open_deals.get(group_key)
                if sign > 0:
                    if group is None:
                        group = self.open_deals[group_key] = {}
                    group[deal_id] = OPEN_DEAL.pack(
                        entered, NO_DATE if expected is None else expected, value, alerted)
                elif group is not None:
                    group.pop(deal_id, None)
                    if not group:
                        del self.open_deals[group_key]
            elif sign > 0:  # accounts
                self.accounts[key] = value
            else:
                self.accounts.pop(key, None)

    def open_deal_keys(self) -> Iterator[tuple]:
        """The index as the contributions' OPEN_DEALS keys and amounts (tests, tools)."""
        for (pl, stage, currency, category), group in self.open_deals.items():
            for deal_id, packed in group.items():
                entered, expected, micro, alerted = OPEN_DEAL.unpack(packed)
                yield ((pl, stage, currency, entered, deal_id, alerted,
                        None if expected == NO_DATE else expected, category), int(micro))

    def hourly_sums(self, family: str, ranges: tuple[tuple[str, int], ...],
                    now_hour: int) -> dict[str, dict]:
        """Sums of an hourly family per range (see :class:`HourlySums`): read from every hour
        bucket when the ranges or the hour moved, else kept up to date by :meth:`apply`."""
        views = self.hourly.setdefault(family, {})
        self._routes.pop(family, None)  # its route may not know these views yet
        names = tuple(name for name, _ in ranges)
        current = views.get(names)
        if current is None or current.now_hour != now_hour or current.ranges != ranges:
            current = views[names] = HourlySums(ranges, now_hour)
            if family in HISTOGRAMS:
                for key, hist in self.hists.get(family, {}).items():
                    current.add_hist(key, hist)
            else:
                for key, value in self.counters.get(family, {}).items():
                    current.add(key, value)
        return current.sums

    def replace(self, before: Contribution, after: Contribution) -> None:
        """Take ``before`` out and put ``after`` in: the same as ``apply(before, -1)`` then
        ``apply(after, 1)``, but items found in both are left alone (a stage move keeps most
        of a deal's items: the stages reached and the stays before it).

        The same sums whenever ``before`` is in the fold (as the processors keep it) and a
        contribution holds at most one ``open_deals`` or ``accounts`` entry per key (as every
        contribution built here does); only the order of keys in the fold's dicts may differ.
        tests/test_deal.py pins it."""
        if before == after:
            return
        if before and after:
            before, after = _difference(before, after)
        if before:
            self.apply(before, -1)
        if after:
            self.apply(after, 1)

    @classmethod
    def of(cls, contributions: Iterable[Contribution]) -> Fold:
        fold = cls()
        for contribution in contributions:
            fold.apply(contribution, 1)
        return fold

    def merge(self, other: Fold, skip: frozenset[str] = frozenset()) -> None:
        """Add another fold's counters and histograms, but for the ``skip`` families (used to
        combine partitions at scrape time)."""
        for family, values in other.counters.items():
            if family in skip:
                continue
            mine = self.counters.setdefault(family, {})
            for key, value in values.items():
                mine[key] = mine.get(key, 0) + value
        for family, hists in other.hists.items():
            if family in skip:
                continue
            mine_h = self.hists.setdefault(family, {})
            for key, hist in hists.items():
                hist_of(mine_h, key, len(hist.counts)).add(hist)

    def snapshot(self) -> dict:
        """Plain data for comparisons in tests."""
        return {
            "open_deals": dict(self.open_deal_keys()),
            "accounts": dict(self.accounts),
            "counters": {f: dict(v) for f, v in self.counters.items() if v},
            "hists": {
                f: {k: (list(h.counts), h.count, h.total) for k, h in v.items()}
                for f, v in self.hists.items() if v
            },
        }


def _difference(before: Contribution, after: Contribution) -> tuple[list[Item], list[Item]]:
    """(items only in ``before``, items only in ``after``), as multisets. Items are grouped by
    family: a family holds a few items, so finding one is a short scan in C (cheaper than
    hashing every item twice)."""
    pending: dict[str, list[Item]] = {}
    for item in before:
        same = pending.get(item[0])
        if same is None:
            pending[item[0]] = [item]
        else:
            same.append(item)
    added = []
    for item in after:
        same = pending.get(item[0])
        if same and item in same:
            same.remove(item)
        else:
            added.append(item)
    removed: list[Item] = []
    for same in pending.values():
        removed += same
    return removed, added


def _route(fold: Fold, family: str) -> tuple:
    """(kind, the family's dict in counters or hists, its hourly views or None, histogram
    bounds), made when the family is first applied (creating its dict then, as apply always
    did) and dropped by hourly_sums when it adds the family's views. The dicts it holds are
    only ever created here (or by merge, the same way), never replaced."""
    kind = _KIND.get(family)
    if kind is None:
        values = fold.counters.get(family)
        if values is None:
            values = fold.counters[family] = {}
        route: tuple = (_COUNTER, values, fold.hourly.get(family), None)
    elif kind.__class__ is list:
        hists = fold.hists.get(family)
        if hists is None:
            hists = fold.hists[family] = {}
        route = (_HISTOGRAM, hists, fold.hourly.get(family), kind)
    else:
        route = (kind, None, None, None)
    fold._routes[family] = route
    return route
