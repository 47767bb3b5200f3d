"""Money KPIs converted to the reporting currency (docs/kpis.md, "Reporting currency").

Beside the native-currency gauges: won revenue converts each close hour's amount at the rate in
force on its close date, open value at the rate in force at the clock. An amount whose currency
has no rate for its date is in no converted sum: it is exported, native, as
``funnel_reporting_unconverted_value``, never dropped and never counted 1:1. Conversion reads
every hour bucket of the won families at each scrape (rates can change any time, so nothing
converted is kept), and rounds each sum once, at export.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction

from prometheus_client.core import GaugeMetricFamily, Metric

from models import aggregates as agg
from models.config import FunnelConfig
from models.fold import Fold
from models.periods import PERIODS, period_first_hours
from models.rates import ALL_TIME, Bucket, RateBook, convert, rate_lookup
from sinks.open_deals import currencies

KINDS = ("won", "open")


def _hour_buckets(folds: Iterable[Fold], family: str) -> Iterator[Bucket]:
    """(labels, currency, hour, micro) of every hour bucket of ``family`` (labels…, currency,
    hour)."""
    for fold in folds:
        for key, micro in fold.counters.get(family, {}).items():
            yield key[:-2], key[-2], key[-1], micro


def _gauge(name: str, doc: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def _money(value: Fraction | int) -> float:
    """Micro units → units, rounded once."""
    return float(Fraction(value) / agg.MICRO)


def reporting_gauges(config: FunnelConfig, rates: RateBook | None, folds: list[Fold], fold: Fold,
                     now_ms: int, quota_owners: dict[str, set[str]]) -> Iterator[Metric]:
    """The ``funnel_reporting_*`` gauges and ``funnel_exchange_rate`` (nothing without a
    reporting currency or a rate book). ``fold``: the partitions' counters merged;
    ``quota_owners``: pipeline → reps with a quota (exported as 0 when they won nothing)."""
    reporting = config.reporting_currency
    if not reporting or rates is None:
        return
    table = rates.table
    rate_at = rate_lookup(table, reporting, config.zone)
    now_hour = now_ms // agg.HOUR_MS
    windows = tuple((w, first, now_hour) for w, first in agg.window_ranges(now_hour))
    periods = tuple((p, first, now_hour) for p, first in
                    period_first_hours(now_ms, config.zone, config.fiscal_year_start_month))
    won, won_missing = convert(_hour_buckets(folds, agg.WON_REVENUE_W), rate_at,
                               (ALL_TIME, *windows, *periods))
    reps, _ = convert(_hour_buckets(folds, agg.REP_WON_W), rate_at, (ALL_TIME, *periods))
    open_value, open_missing = convert(
        ((key[:2], key[2], now_hour, micro) for key, micro in
         fold.counters.get(agg.OPEN_VALUE, {}).items()), rate_at, (ALL_TIME,))

    total = _gauge("funnel_reporting_won_revenue", "Won amounts in the reporting currency "
                   "(each at its close date's rate)", ("pipeline", "currency"))
    window = _gauge("funnel_reporting_won_revenue_window", "Won within the window, in the "
                    "reporting currency", ("pipeline", "currency", "window"))
    period = _gauge("funnel_reporting_won_revenue_period", "Won in the current (fiscal) period, "
                    "in the reporting currency", ("pipeline", "currency", "period"))
    for name in config.pipelines:
        total.add_metric((name, reporting), _money(won["all"].get((name,), 0)))
        for w in agg.WINDOWS:
            window.add_metric((name, reporting, w), _money(won[w].get((name,), 0)))
        for p in PERIODS:
            period.add_metric((name, reporting, p), _money(won[p].get((name,), 0)))
    opened = _gauge("funnel_reporting_open_value", "Open amounts in the reporting currency (rate "
                    "in force at the clock)", ("pipeline", "stage", "currency"))
    for name, pipeline in config.pipelines.items():
        for stage in pipeline.open_stages:
            opened.add_metric((name, stage.name, reporting),
                              _money(open_value["all"].get((name, stage.name), 0)))
    yield from (total, window, period, opened)
    yield from _rep_gauges(reporting, reps, quota_owners)
    yield _unconverted(config, reporting, table.currencies, {"won": won_missing, "open": open_missing})
    rate = _gauge("funnel_exchange_rate", "Units of the reporting currency per unit of the "
                  "currency, in force at the clock (config-like: aggregate with max)", ("currency",))
    for currency in sorted({reporting, *table.currencies}):
        value = rate_at(currency, now_hour)
        if value is not None:
            rate.add_metric((currency,), float(value))
    yield rate


def _rep_gauges(reporting: str, reps: dict[str, dict[tuple, Fraction]],
                quota_owners: dict[str, set[str]]) -> Iterator[Metric]:
    total = _gauge("funnel_reporting_rep_won_revenue", "Won amounts per sales rep (owner at "
                   "close) in the reporting currency", ("pipeline", "owner", "currency"))
    period = _gauge("funnel_reporting_rep_won_revenue_period", "Won per sales rep in the "
                    "current (fiscal) period, in the reporting currency",
                    ("pipeline", "owner", "currency", "period"))
    seeded = {(pl, owner) for pl, owners in quota_owners.items() for owner in owners}
    for key in sorted(seeded | set(reps["all"])):
        total.add_metric((*key, reporting), _money(reps["all"].get(key, 0)))
        for p in PERIODS:
            period.add_metric((*key, reporting, p), _money(reps[p].get(key, 0)))
    yield from (total, period)


def _unconverted(config: FunnelConfig, reporting: str, rated: list[str],
                 missing: dict[str, dict[tuple, int]]) -> Metric:
    """Native amounts left out of the converted sums, per kind; every known currency (the
    pipeline's, those with rates) but the reporting one exported, 0 included."""
    metric = _gauge("funnel_reporting_unconverted_value", "Native amounts in no converted sum: "
                    "their currency has no rate for the date", ("pipeline", "currency", "kind"))
    rows: dict[tuple, int] = {}
    for name in config.pipelines:
        for currency in {*currencies(config, name), *rated}:
            if currency != reporting:
                for kind in KINDS:
                    rows[(name, currency, kind)] = 0
    for kind, per_labels in missing.items():
        for (labels, currency), micro in per_labels.items():
            key = (labels[0], currency, kind)
            rows[key] = rows.get(key, 0) + micro
    for key in sorted(rows):
        metric.add_metric(key, _money(rows[key]))
    return metric
