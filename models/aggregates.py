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

from models.config import FORECAST_PROPERTY, FunnelConfig
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
REP_WON_W = "rep_won_w"            # (pipeline, owner, currency, hour), micro
CUSTOMERS = "customers"            # (pipeline,)
REACHED_W = "reached_w"            # (pipeline, stage, hour)
CLOSED_W = "closed_w"              # (pipeline, outcome, hour)
WON_REVENUE_W = "won_revenue_w"    # (pipeline, currency, hour), micro
# Dimension family: one item for all the configured dimensions, key
# (pipeline, the deal's values in the config's order, stage, currency, furthest open stage
# reached or ""), value a packed sum (see pack_dimension): deals, cycle ms (closed deals) and
# amounts (micro) at once. One item, not one per dimension: three dimensions cost a deal one
# item more; the export splits the value tuples per dimension (models/dimensions.py).
DIMENSION = "dimension"
NO_VALUE = "none"  # the value of a deal without one for a dimension
# Index family: one entry per open deal, value = amount (micro); the key carries what stall,
# period and forecast gauges need at scrape time:
# (pipeline, stage, currency, entered ms, deal_id, stall alert raised, expected close ms | None,
#  forecast category)
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
HOURLY = frozenset({REACHED_W, CLOSED_W, WON_REVENUE_W, TIME_TO_CLOSE_W, REP_WON_W})


def window_ranges(now_hour: int) -> tuple[tuple[str, int], ...]:
    """The rolling windows as hour ranges ending at ``now_hour``: a bucket counts when it
    starts within (now − W, now]."""
    return tuple((window, now_hour - length // HOUR_MS + 1) for window, length in WINDOWS.items())

Item = tuple[str, tuple, int]
Contribution = tuple[Item, ...]
NOTHING: Contribution = ()


# A dimension item's value packs three sums into one int, so one item per dimension carries
# them: deals in the low 32 bits, cycle ms in the next 64, amount micro units above. Python ints
# never overflow and every part is ≥ 0, so packed values add and subtract like their parts while
# a fold key holds under 2^32 deals and 2^64 ms of cycle (~584 million deal-years).
_CYCLE_SHIFT = 32
_AMOUNT_SHIFT = 96


def pack_dimension(deals: int, cycle_ms: int, amount_micro: int) -> int:
    return deals + (cycle_ms << _CYCLE_SHIFT) + (amount_micro << _AMOUNT_SHIFT)


def unpack_dimension(packed: int) -> tuple[int, int, int]:
    """(deals, cycle ms, amount micro) of a packed sum."""
    return (packed & 0xFFFF_FFFF, (packed >> _CYCLE_SHIFT) & 0xFFFF_FFFF_FFFF_FFFF,
            packed >> _AMOUNT_SHIFT)


def to_micro(amount: object) -> int:
    return 0 if amount is None else round(float(amount) * MICRO)  # type: ignore[arg-type]


class _Plan:
    """What :func:`deal_contribution` needs of one configured pipeline, looked up once: per
    stage name whether it is open, its outcome, its reached level, and the items and keys that
    depend on nothing but the stage (built once and shared by every contribution)."""

    __slots__ = ("categories", "dimensions", "levels", "no_values", "reached", "stages")

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
        self.dimensions = tuple(config.dimensions)
        # Per open stage, the forecast category of a deal whose CRM gives none.
        self.categories = {stage.name: config.forecast_category(pl, stage.name, None)
                           for stage in pipeline.open_stages}
        self.no_values = (NO_VALUE,) * len(self.dimensions)  # a deal without properties


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
        crm = deal.properties.get(FORECAST_PROPERTY) if deal.properties else None
        category = (plan.categories[last] if crm is None or crm.value is None
                    else config.forecast_category(pl, last, crm.value))  # type: ignore[arg-type]
        items: list[Item] = [
            open_item,
            (OPEN_VALUE, (pl, last, currency), amount),
            (OPEN_DEALS, (pl, last, currency, entered, deal.deal_id,
                          alert is not None and alert == [last, entered],
                          None if expected is None else expected.value, category), amount),
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
                (REP_WON_W, (pl, owner, currency, window_key[2]), amount),
            )
    items += reached_items
    items += durations
    dimensions = plan.dimensions
    if dimensions:
        properties = deal.properties
        if properties:
            found = []  # a loop: a comprehension's own call costs more on so few items
            for name in dimensions:
                field = properties.get(name)
                found.append(NO_VALUE if field is None or field.value is None else field.value)
            values = tuple(found)
        else:
            values = plan.no_values
        packed = 1 + (amount << _AMOUNT_SHIFT)
        if not is_open:
            packed += (entered - first) << _CYCLE_SHIFT
        items.append((DIMENSION, (pl, values, last, currency,
                                  reached[n_reached - 1][1] if n_reached else ""), packed))
    return tuple(items)


def customer_contribution(account: str, totals: dict[tuple[str, str], int]) -> Contribution:
    """One account's contribution: a customer per pipeline, lifetime value per currency.
    ``totals``: (pipeline, currency) → won micro units, for each pair with a credited deal."""
    items: list[Item] = [(CUSTOMERS, (pl,), 1) for pl in sorted({pl for pl, _ in totals})]
    items.extend((CLV, key, total) for key, total in totals.items())
    items.extend((ACCOUNTS, (*key, account), total) for key, total in totals.items())
    return tuple(items)
