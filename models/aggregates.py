"""Aggregates as a fold of deal states (docs/design.md §3, §6).

Every KPI gauge is a sum over deals of that deal's *contribution*: a tuple of
``(family, key, value)`` items computed by a pure function of the deal. The in-memory
:class:`Fold` of a partition is the sum of its deals' contributions, kept up to date by
subtracting a deal's old contribution and adding its new one, and rebuilt from the table on
assignment. Because both paths use the same function, incremental == rebuilt by construction.

Money is summed in integer micro-units and durations in integer milliseconds, so adding and
removing contributions in any order leaves no floating-point residue.
"""

from __future__ import annotations

import bisect
import itertools
import struct
from collections.abc import Iterable, Iterator

from models.config import FunnelConfig
from models.deal import Deal

MICRO = 1_000_000
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WINDOWS = {"7d": 7 * DAY_MS, "30d": 30 * DAY_MS, "90d": 90 * DAY_MS}
OUTCOMES = ("won", "lost")

# Counter families: value is an integer amount.
OPEN = "open"                      # (pipeline, stage)
OPEN_VALUE = "open_value"          # (pipeline, stage, currency), micro
REACHED = "reached"                # (pipeline, stage)
CLOSED = "closed"                  # (pipeline, outcome)
WON_REVENUE = "won_revenue"        # (pipeline, currency), micro
REP_WON = "rep_won"                # (pipeline, owner, currency), micro
CUSTOMERS = "customers"            # (pipeline,)
REACHED_W = "reached_w"            # (pipeline, stage, hour)
CLOSED_W = "closed_w"              # (pipeline, outcome, hour)
WON_REVENUE_W = "won_revenue_w"    # (pipeline, currency, hour), micro
# Index family: one entry per open deal, value = amount (micro); the key carries what stall,
# period and forecast gauges need at scrape time:
# (pipeline, stage, currency, entered ms, deal_id, stall alert raised, expected close ms | None)
OPEN_DEALS = "open_deals"
# Index family: one entry per customer and pipeline/currency, value = lifetime value (micro):
# (pipeline, currency, account)
ACCOUNTS = "accounts"
# Histogram families: value is one observation.
WON_VALUE = "won_value"            # (pipeline, currency), micro
TIME_TO_CLOSE = "time_to_close"    # (pipeline, outcome), ms
STAGE_DURATION = "stage_duration"  # (pipeline, stage), ms
CLV = "clv"                        # (pipeline, currency), micro
TIME_TO_CLOSE_W = "time_to_close_w"  # (pipeline, outcome, hour), ms

_MONEY = [b * MICRO for b in (100, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
                              250_000, 1_000_000)]
_CLV = [b * MICRO for b in (1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
                            1_000_000, 5_000_000)]
_CYCLE = [d * DAY_MS for d in (1, 3, 7, 14, 30, 60, 90, 120, 180, 365)]
_STAY = [HOUR_MS, *(d * DAY_MS for d in (1, 3, 7, 14, 30, 60, 90, 180, 365))]
BUCKETS: dict[str, list[int]] = {
    WON_VALUE: _MONEY, CLV: _CLV, TIME_TO_CLOSE: _CYCLE, TIME_TO_CLOSE_W: _CYCLE,
    STAGE_DURATION: _STAY,
}
HISTOGRAMS = frozenset(BUCKETS)
# Families keyed by (labels..., hour): as many keys as hours of history, so scrapes read them
# per partition into window sums instead of merging them first.
HOURLY = frozenset({REACHED_W, CLOSED_W, WON_REVENUE_W, TIME_TO_CLOSE_W})


def window_ranges(now_hour: int) -> tuple[tuple[str, int], ...]:
    """The rolling windows as hour ranges ending at ``now_hour``: a bucket counts when it
    starts within (now − W, now]."""
    return tuple((window, now_hour - length // HOUR_MS + 1) for window, length in WINDOWS.items())

Item = tuple[str, tuple, int]
Contribution = tuple[Item, ...]
NOTHING: Contribution = ()


def to_micro(amount: object) -> int:
    return 0 if amount is None else round(float(amount) * MICRO)  # type: ignore[arg-type]


def stays_of(deal: Deal, config: FunnelConfig) -> tuple[str, list[tuple[int, str]]]:
    """(pipeline, stays): the stage history with consecutive repeats collapsed, as
    (entered ms, stage); no stays when the deal is deleted or has no known stage."""
    # Fields read directly rather than through Deal.value: this runs twice per written deal.
    pl = (deal.pipeline.value if deal.pipeline is not None else None) or "default"
    pipeline = config.pipelines.get(pl)  # type: ignore[arg-type]
    if (deal.deleted is not None and deal.deleted.value) or pipeline is None:
        return pl, []  # type: ignore[return-value]
    by_name = pipeline.by_name
    stays: list[tuple[int, str]] = []
    last = None
    for ts, _, stage in deal.history:
        if stage != last and stage in by_name:
            stays.append((ts, stage))
            last = stage
    return pl, stays  # type: ignore[return-value]


def open_stay(deal: Deal, config: FunnelConfig) -> list | None:
    """[stage, entered ms] of the deal's current stay when it is open, else None."""
    pl, stays = stays_of(deal, config)
    if stays and config.pipelines[pl].by_name[stays[-1][1]].is_open:
        return [stays[-1][1], stays[-1][0]]
    return None


def deal_contribution(deal: Deal, config: FunnelConfig) -> Contribution:
    """What one deal adds to every aggregate; empty when deleted or not in the funnel."""
    pl, stays = stays_of(deal, config)
    if not stays:
        return NOTHING
    pipeline = config.pipelines[pl]
    by_name = pipeline.by_name
    items: list[Item] = []
    add = items.append
    entered, stage_name = stays[-1]
    stage = by_name[stage_name]
    amount = 0 if deal.amount is None else to_micro(deal.amount.value)
    currency = (deal.currency.value if deal.currency is not None else None) or config.default_currency
    if stage.is_open:
        add((OPEN, (pl, stage_name), 1))
        add((OPEN_VALUE, (pl, stage_name, currency), amount))
        alerted = deal.stall_alert == [stage_name, entered]
        add((OPEN_DEALS, (pl, stage_name, currency, entered, deal.deal_id, alerted,
                          deal.value("expected_close_at")), amount))
    else:
        outcome = stage.outcome
        cycle = entered - stays[0][0]
        hour = entered // HOUR_MS
        add((CLOSED, (pl, outcome), 1))
        add((CLOSED_W, (pl, outcome, hour), 1))
        add((TIME_TO_CLOSE, (pl, outcome), cycle))
        add((TIME_TO_CLOSE_W, (pl, outcome, hour), cycle))
        if outcome == "won":
            owner = deal.owner_at(entered) or ""
            add((WON_REVENUE, (pl, currency), amount))
            add((WON_REVENUE_W, (pl, currency, hour), amount))
            add((WON_VALUE, (pl, currency), amount))
            add((REP_WON, (pl, owner, currency), amount))
    # Reached: every open stage up to the furthest one in the history (won passes them all),
    # entered when the deal first got that far (skip-ahead fills the stages it jumped over).
    open_index = pipeline.open_index
    open_stages = pipeline.open_stages
    reached_at: list[int] = []
    for ts, name in stays:
        level = open_index.get(name)
        if level is not None:
            while len(reached_at) <= level:
                reached_at.append(ts)
    for level, ts in enumerate(reached_at):
        name = open_stages[level].name
        add((REACHED, (pl, name), 1))
        add((REACHED_W, (pl, name, ts // HOUR_MS), 1))
    for (start, name), (end, _) in itertools.pairwise(stays):
        add((STAGE_DURATION, (pl, name), end - start))
    return tuple(items)


def customer_contribution(account: str, totals: dict[tuple[str, str], int]) -> Contribution:
    """One account's contribution: a customer per pipeline, lifetime value per currency.
    ``totals``: (pipeline, currency) → won micro units, for each pair with a credited deal."""
    items: list[Item] = [(CUSTOMERS, (pl,), 1) for pl in sorted({pl for pl, _ in totals})]
    items.extend((CLV, key, total) for key, total in totals.items())
    items.extend((ACCOUNTS, (*key, account), total) for key, total in totals.items())
    return tuple(items)


class HourlySums:
    """One hourly family summed over ranges of hours that all end at ``now_hour``: per range
    name, labels → total (counters) or :class:`Hist`. A range is (name, first hour included);
    a bucket counts when first ≤ its hour ≤ now_hour. :meth:`Fold.hourly_sums` keeps one per
    family up to date as deals change, so a scrape reads sums instead of every hour bucket."""

    __slots__ = ("now_hour", "ranges", "sums")

    def __init__(self, ranges: tuple[tuple[str, int], ...], now_hour: int) -> None:
        self.ranges = ranges
        self.now_hour = now_hour
        self.sums: dict[str, dict[tuple, int]] | dict[str, dict[tuple, Hist]] = {
            name: {} for name, _ in ranges
        }

    def _holding(self, key: tuple) -> list[dict]:
        """The sums of every range that holds this bucket's hour."""
        hour = key[-1]
        if hour > self.now_hour:
            return []
        return [self.sums[name] for name, first in self.ranges if hour >= first]

    def add(self, key: tuple, value: int) -> None:
        labels = key[:-1]
        for target in self._holding(key):
            total = target.get(labels, 0) + value
            if total:
                target[labels] = total
            else:
                target.pop(labels, None)

    def observe(self, key: tuple, bounds: list[int], value: int, sign: int) -> None:
        labels = key[:-1]
        for target in self._holding(key):
            hist = hist_of(target, labels, len(bounds) + 1)
            hist.observe(bounds, value, sign)
            if hist.count == 0:
                del target[labels]

    def add_hist(self, key: tuple, other: Hist) -> None:
        labels = key[:-1]
        for target in self._holding(key):
            hist_of(target, labels, len(other.counts)).add(other)


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


def hist_of(hists: dict, key: tuple, size: int) -> Hist:
    """``hists[key]``, created empty with ``size`` buckets when missing."""
    hist = hists.get(key)
    if hist is None:
        hist = hists[key] = Hist(size)
    return hist


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
        self.counts[bisect.bisect_left(bounds, value)] += sign
        self.count += sign
        self.total += sign * value


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

    Open deals are grouped ``open_deals[(pipeline, stage, currency)][deal_id]`` with the rest
    packed in 25 bytes (:data:`OPEN_DEAL`): ~170 B a deal, where a dict keyed by the whole
    7-tuple took ~340 B (bench: RSS per open deal)."""

    __slots__ = ("accounts", "counters", "hists", "hourly", "open_deals")

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple, int]] = {}
        self.hists: dict[str, dict[tuple, Hist]] = {}
        self.open_deals: dict[tuple[str, str, str], dict[str, bytes]] = {}
        self.accounts: dict[tuple, int] = {}
        # Hourly family → range names → the sums last asked for (kept up to date by apply).
        self.hourly: dict[str, dict[tuple[str, ...], HourlySums]] = {}

    def apply(self, contribution: Contribution, sign: int) -> None:
        for family, key, value in contribution:
            if family == OPEN_DEALS:
                self._index_open_deal(key, value, sign)
            elif family == ACCOUNTS:
                if sign > 0:
                    self.accounts[key] = value
                else:
                    self.accounts.pop(key, None)
            elif family in HISTOGRAMS:
                self._observe(family, key, value, sign)
            else:
                values = self.counters.get(family)
                if values is None:
                    values = self.counters[family] = {}
                total = values.get(key, 0) + sign * value
                if total:
                    values[key] = total
                else:
                    values.pop(key, None)
                if self.hourly and family in self.hourly:
                    for sums in self.hourly[family].values():
                        sums.add(key, sign * value)

    def _index_open_deal(self, key: tuple, micro: int, sign: int) -> None:
        pl, stage, currency, entered, deal_id, alerted, expected = key
        group = self.open_deals.get((pl, stage, currency))
        if sign > 0:
            if group is None:
                group = self.open_deals[(pl, stage, currency)] = {}
            group[deal_id] = OPEN_DEAL.pack(entered, NO_DATE if expected is None else expected,
                                            micro, alerted)
        elif group is not None:
            group.pop(deal_id, None)
            if not group:
                del self.open_deals[(pl, stage, currency)]

    def open_deal_keys(self) -> Iterator[tuple]:
        """The index as the contributions' OPEN_DEALS keys and amounts (tests, tools)."""
        for (pl, stage, currency), group in self.open_deals.items():
            for deal_id, packed in group.items():
                entered, expected, micro, alerted = OPEN_DEAL.unpack(packed)
                yield ((pl, stage, currency, entered, deal_id, alerted,
                        None if expected == NO_DATE else expected), int(micro))

    def _observe(self, family: str, key: tuple, value: int, sign: int) -> None:
        bounds = BUCKETS[family]
        hists = self.hists.get(family)
        if hists is None:
            hists = self.hists[family] = {}
        hist = hist_of(hists, key, len(bounds) + 1)
        hist.observe(bounds, value, sign)
        if hist.count == 0:
            del hists[key]
        if self.hourly and family in self.hourly:
            for sums in self.hourly[family].values():
                sums.observe(key, bounds, value, sign)

    def hourly_sums(self, family: str, ranges: tuple[tuple[str, int], ...],
                    now_hour: int) -> dict[str, dict]:
        """Sums of an hourly family per range (see :class:`HourlySums`): read from every hour
        bucket when the ranges or the hour moved, else kept up to date by :meth:`apply`."""
        views = self.hourly.setdefault(family, {})
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
        if before != after:
            self.apply(before, -1)
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
