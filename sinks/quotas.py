"""Quotas and what attainment divides them by (docs/kpis.md, "Quotas and attainment").

The quotas are config gauges (identical on every worker: aggregate with max); each rep's won
revenue per current (fiscal) period is a business gauge summed by the rules, which divide it by
the quota (prometheus/rules/funnel_recording.yml). Ratios are never exported here.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from models import aggregates as agg
from models.config import FunnelConfig
from models.fold import Fold
from models.hourly import hourly_totals
from models.periods import PERIODS, period_first_hours


def quota_owners(config: FunnelConfig) -> dict[str, set[str]]:
    """Pipeline → the reps with a quota: their period rows are exported even at 0."""
    return {config.quotas.pipeline: set(config.quotas.reps)} if config.quotas.reps else {}


def quota_config_gauges(config: FunnelConfig) -> Iterator[Metric]:
    """``funnel_rep_quota`` and ``funnel_team_quota`` from the config's ``quotas``."""
    quotas = config.quotas
    currency = config.quota_currency
    for kind, label, entries in (("rep", "owner", quotas.reps), ("team", "team", quotas.teams)):
        metric = GaugeMetricFamily(
            f"funnel_{kind}_quota", f"Configured won-revenue quota of a {kind} per (fiscal) period",
            labels=("pipeline", label, "period", "currency"))
        for name, periods in sorted(entries.items()):
            for period, amount in periods.items():
                metric.add_metric((quotas.pipeline, name, period, currency), amount)
        yield metric


def rep_period_gauge(config: FunnelConfig, folds: list[Fold], now_ms: int) -> Metric:
    """``funnel_rep_won_revenue_period``: won per rep (owner at close) in each current (fiscal)
    period, native currency; reps with a quota exported in the quota currency even at 0."""
    metric = GaugeMetricFamily(
        "funnel_rep_won_revenue_period", "Won per sales rep in the current (fiscal) period",
        labels=("pipeline", "owner", "currency", "period"))
    ranges = period_first_hours(now_ms, config.zone, config.fiscal_year_start_month)
    sums = hourly_totals(folds, agg.REP_WON_W, ranges, now_ms // agg.HOUR_MS)
    keys = {key for per_period in sums.values() for key in per_period}
    keys |= {(pl, owner, config.quota_currency)
             for pl, owners in quota_owners(config).items() for owner in owners}
    for key in sorted(keys):
        for period in PERIODS:
            metric.add_metric((*key, period), sums[period].get(key, 0) / agg.MICRO)
    return metric
