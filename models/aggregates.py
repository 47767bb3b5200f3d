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
_bisect_left = bisect.bisect_left
_COUNTER = 0
_HISTOGRAM = 1
_OPEN_DEALS = 2
_ACCOUNTS = 3
# Family → how Fold.apply folds it: histograms → their bounds, the two indexes → a number;
# counters are not listed.
_KIND: dict[str, list[int] | int] = {**BUCKETS, OPEN_DEALS: _OPEN_DEALS, ACCOUNTS: _ACCOUNTS}
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


class _Plan:
    """What :func:`deal_contribution` needs of one configured pipeline, looked up once: per
    stage name whether it is open, its outcome, its reached level, and the items and keys that
    depend on nothing but the stage (built once and shared by every contribution)."""

    __slots__ = ("levels", "reached", "stages")

    def __init__(self, config: FunnelConfig, pl: str) -> None:
        pipeline = config.pipelines[pl]
        # name → (is open, outcome, (pl, name), OPEN item, (pl, outcome), CLOSED item)
        self.stages: dict[str, tuple] = {}
        for stage in pipeline.stages:
            key = (pl, stage.name)
            outcome_key = (pl, stage.outcome)
            self.stages[stage.name] = (stage.is_open, stage.outcome, key, (OPEN, key, 1),
                                       outcome_key, (CLOSED, outcome_key, 1))
        self.levels: dict[str, int] = dict(pipeline.open_index)
        # Per reached level: (its REACHED item, the stage name).
        self.reached: list[tuple[Item, str]] = [
            ((REACHED, (pl, stage.name), 1), stage.name) for stage in pipeline.open_stages]


# Plans per config, by identity (a config copied with other pipelines gets its own): a few
# configs at most live at a time (tests make more; they are dropped past 16).
_PLANS: dict[int, tuple[FunnelConfig, dict[str, _Plan]]] = {}


_LAST: tuple = (None, {})  # (the config last asked about, its plans): the usual hit


def _plan(config: FunnelConfig, pl: str) -> _Plan | None:
    """The plan of pipeline ``pl``; ``None`` when it is not configured."""
    global _LAST
    last = _LAST  # read once: another thread may replace it
    if config is last[0]:
        plans = last[1]
    else:
        entry = _PLANS.get(id(config))
        if entry is None or entry[0] is not config:
            if len(_PLANS) >= 16:
                _PLANS.clear()
            entry = _PLANS[id(config)] = (config, {})
        _LAST = entry
        plans = entry[1]
    plan = plans.get(pl)
    if plan is None and pl in config.pipelines:
        plan = plans[pl] = _Plan(config, pl)
    return plan


def _stays(deal: Deal, stages: dict) -> list[tuple[int, str]]:
    """The stage history with consecutive repeats collapsed, as (entered ms, stage); entries
    whose stage is not in ``stages`` skipped (and never break a repeat)."""
    stays: list[tuple[int, str]] = []
    last = None
    for ts, _, stage in deal.history:
        if stage != last and stage in stages:
            stays.append((ts, stage))
            last = stage
    return stays


def stays_of(deal: Deal, config: FunnelConfig) -> tuple[str, list[tuple[int, str]]]:
    """(pipeline, stays): the stage history with consecutive repeats collapsed, as
    (entered ms, stage); no stays when the deal is deleted or has no known stage."""
    pl = (deal.pipeline.value if deal.pipeline is not None else None) or "default"
    pipeline = config.pipelines.get(pl)  # type: ignore[arg-type]
    if (deal.deleted is not None and deal.deleted.value) or pipeline is None:
        return pl, []  # type: ignore[return-value]
    return pl, _stays(deal, pipeline.by_name)  # type: ignore[return-value]


def open_stay(deal: Deal, config: FunnelConfig) -> list | None:
    """[stage, entered ms] of the deal's current stay when it is open, else None."""
    pl = (deal.pipeline.value if deal.pipeline is not None else None) or "default"
    plan = _plan(config, pl)  # type: ignore[arg-type]
    if plan is None or (deal.deleted is not None and deal.deleted.value):
        return None
    stays = _stays(deal, plan.stages)
    if stays and plan.stages[stays[-1][1]][0]:
        return [stays[-1][1], stays[-1][0]]
    return None


def deal_contribution(deal: Deal, config: FunnelConfig) -> Contribution:
    """What one deal adds to every aggregate; empty when deleted or not in the funnel."""
    # Runs twice per written deal, so in one pass over the history: the stays (as stays_of
    # collapses them), the stages reached and the stays' durations; fields are read directly
    # (not through Deal.value), and what depends only on the pipeline and stage comes from its
    # plan. Items come out in the order of: head (open or closed), reached, durations.
    pl = (deal.pipeline.value if deal.pipeline is not None else None) or "default"
    memo = _LAST  # _plan's usual hit, inlined
    plan = memo[1].get(pl) if config is memo[0] else None
    if plan is None:
        plan = _plan(config, pl)  # type: ignore[arg-type]
    if plan is None or (deal.deleted is not None and deal.deleted.value):
        return NOTHING
    stages = plan.stages
    levels = plan.levels
    reached = plan.reached
    reached_items: list[Item] = []
    add_reached = reached_items.append
    durations: list[Item] = []
    last = None  # the stage of the latest stay, entered at ``entered``
    first = entered = 0
    n_reached = 0
    for ts, _, stage in deal.history:
        if stage != last and stage in stages:
            if last is None:
                first = ts
            else:
                durations.append((STAGE_DURATION, stages[last][2], ts - entered))
            # Reached: every open stage up to the furthest one in the history (won passes them
            # all), entered when the deal first got that far (skip-ahead fills the stages it
            # jumped over).
            level = levels.get(stage)
            if level is not None and level >= n_reached:
                hour = ts // HOUR_MS
                while n_reached <= level:
                    item, name = reached[n_reached]
                    add_reached(item)
                    add_reached((REACHED_W, (pl, name, hour), 1))
                    n_reached += 1
            last = stage
            entered = ts
    if last is None:
        return NOTHING
    is_open, outcome, _, open_item, outcome_key, closed_item = stages[last]
    amount = deal.amount.value if deal.amount is not None else None  # to_micro, inlined
    amount = 0 if amount is None else round(float(amount) * MICRO)  # type: ignore[arg-type]
    currency = (deal.currency.value if deal.currency is not None else None) or config.default_currency
    if is_open:
        alert = deal.stall_alert
        expected = deal.expected_close_at
        items: list[Item] = [
            open_item,
            (OPEN_VALUE, (pl, last, currency), amount),
            (OPEN_DEALS, (pl, last, currency, entered, deal.deal_id,
                          alert is not None and alert == [last, entered],
                          None if expected is None else expected.value), amount),
        ]
    else:
        window_key = (pl, outcome, entered // HOUR_MS)
        items = [
            closed_item,
            (CLOSED_W, window_key, 1),
            (TIME_TO_CLOSE, outcome_key, entered - first),
            (TIME_TO_CLOSE_W, window_key, entered - first),
        ]
        if outcome == "won":
            owner = deal.owner_at(entered) or ""
            money_key = (pl, currency)
            items += (
                (WON_REVENUE, money_key, amount),
                (WON_REVENUE_W, (pl, currency, window_key[2]), amount),
                (WON_VALUE, money_key, amount),
                (REP_WON, (pl, owner, currency), amount),
            )
    items += reached_items
    items += durations
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
        labels = key[:-1]
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = [0] * len(self._names)
        for first, slot in self._slots:
            if hour >= first:
                cell[slot] += value

    def observe(self, key: tuple, bounds: list[int], value: int, sign: int) -> None:
        hour = key[-1]
        if hour > self.now_hour or hour < self._first:
            return
        labels = key[:-1]
        cell = self._cells.get(labels)
        if cell is None:
            cell = self._cells[labels] = [None] * len(self._names)
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

    __slots__ = ("_routes", "accounts", "counters", "hists", "hourly", "open_deals")

    def __init__(self) -> None:
        self.counters: dict[str, dict[tuple, int]] = {}
        self.hists: dict[str, dict[tuple, Hist]] = {}
        self.open_deals: dict[tuple[str, str, str], dict[str, bytes]] = {}
        self.accounts: dict[tuple, int] = {}
        # Hourly family → range names → the sums last asked for (kept up to date by apply).
        self.hourly: dict[str, dict[tuple[str, ...], HourlySums]] = {}
        # Family → where apply folds its items (see _route).
        self._routes: dict[str, tuple] = {}

    def _route(self, family: str) -> tuple:
        """(kind, the family's dict in counters or hists, its hourly views or None, histogram
        bounds), made when the family is first applied (creating its dict then, as apply always
        did) and dropped by hourly_sums when it adds the family's views. The dicts it holds are
        only ever created here (or by merge, the same way), never replaced."""
        kind = _KIND.get(family)
        if kind is None:
            values = self.counters.get(family)
            if values is None:
                values = self.counters[family] = {}
            route: tuple = (_COUNTER, values, self.hourly.get(family), None)
        elif kind.__class__ is list:
            hists = self.hists.get(family)
            if hists is None:
                hists = self.hists[family] = {}
            route = (_HISTOGRAM, hists, self.hourly.get(family), kind)
        else:
            route = (kind, None, None, None)
        self._routes[family] = route
        return route

    def apply(self, contribution: Iterable[Item], sign: int) -> None:
        # Runs for every item of every written deal, twice: one look-up finds where an item
        # goes, and what HourlySums.add/observe do is inlined (same steps, same order).
        routes = self._routes
        for family, key, value in contribution:
            route = routes.get(family)
            if route is None:
                route = self._route(family)
            kind, values, views, bounds = route
            if kind == _COUNTER:
                value *= sign
                total = values.get(key, 0) + value
                if total:
                    values[key] = total
                else:
                    values.pop(key, None)
                if views:
                    hour = key[-1]
                    for sums in views.values():
                        if hour > sums.now_hour or hour < sums._first:
                            continue
                        cells = sums._cells
                        labels = key[:-1]
                        cell = cells.get(labels)
                        if cell is None:
                            cell = cells[labels] = [0] * len(sums._names)
                        for first, slot in sums._slots:
                            if hour >= first:
                                cell[slot] += value
            elif kind == _HISTOGRAM:
                hist = values.get(key)
                if hist is None:
                    hist = values[key] = Hist(len(bounds) + 1)
                index = _bisect_left(bounds, value)
                hist.counts[index] += sign
                hist.count += sign
                hist.total += sign * value
                if hist.count == 0:
                    del values[key]
                if views:
                    hour = key[-1]
                    for sums in views.values():
                        if hour > sums.now_hour or hour < sums._first:
                            continue
                        cells = sums._cells
                        labels = key[:-1]
                        cell = cells.get(labels)
                        if cell is None:
                            cell = cells[labels] = [None] * len(sums._names)
                        for first, slot in sums._slots:
                            if hour >= first:
                                hist = cell[slot]
                                if hist is None:
                                    hist = cell[slot] = Hist(len(bounds) + 1)
                                hist.counts[index] += sign
                                hist.count += sign
                                hist.total += sign * value
                                if hist.count == 0:
                                    cell[slot] = None
            elif kind == _OPEN_DEALS:
                pl, stage, currency, entered, deal_id, alerted, expected = key
                group_key = (pl, stage, currency)
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
        for (pl, stage, currency), group in self.open_deals.items():
            for deal_id, packed in group.items():
                entered, expected, micro, alerted = OPEN_DEAL.unpack(packed)
                yield ((pl, stage, currency, entered, deal_id, alerted,
                        None if expected == NO_DATE else expected), int(micro))

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
            # Multiset difference, items grouped by family: a family holds a few items, so
            # finding one is a short scan in C (cheaper than hashing every item twice).
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
            before, after = removed, added  # type: ignore[assignment]
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
