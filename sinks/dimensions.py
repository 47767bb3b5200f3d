"""Prometheus exposition of the KPIs per dimension value (docs/design.md §3, "Dimensions").

Every (pipeline, dimension) exports the same rows for each of its values (the kept ones,
``none`` and ``other``): zeros included, so a value's series never vanish while it is kept,
and the count of series stays within the budget :mod:`models.dimensions` plans for. Once the
fleet has decided which values it keeps (:mod:`models.fleet_values`), every worker exports
those, so summed over the workers each kept value's figures are whole.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from models import aggregates as agg
from models.config import FunnelConfig
from models.dimensions import dimension_kpis
from models.fleet_values import KeptValues
from models.fold import Fold

_KEY = ("pipeline", "dimension", "value")
# (name, help, labels after pipeline, dimension and value) of the per-value KPI gauges.
_KPIS = (
    ("funnel_dimension_deals_open", "Deals currently in the stage, per dimension value", ("stage",)),
    ("funnel_dimension_open_value", "Amounts of deals currently in the stage, per dimension value",
     ("stage", "currency")),
    ("funnel_dimension_deals_reached",
     "Deals that reached this open stage or a later one, per dimension value", ("stage",)),
    ("funnel_dimension_deals_closed", "Deals currently closed, per dimension value",
     ("outcome", "currency")),
    ("funnel_dimension_time_to_close_seconds",
     "Sum over closed deals of first stage entry to close, per dimension value", ("outcome",)),
    ("funnel_dimension_won_revenue", "Amounts of won deals, per dimension value", ("currency",)),
)
# (name, help) of what the guard did, per pipeline and dimension.
_GUARD = (
    ("funnel_dimension_values", "Distinct values with deals in this worker's partitions (none not counted)"),
    ("funnel_dimension_values_folded",
     "Values with deals summed as other on this worker: not kept (beyond max_values or the series budget)"),
    ("funnel_dimension_values_limit", "Values exported at most, besides none and other"),
    ("funnel_dimension_fleet_ranking",
     "1 while the values exported are the fleet's kept values, 0 while this worker ranks its own"),
)


def dimension_gauges(config: FunnelConfig, fold: Fold, kept: KeptValues | None = None) -> Iterator[Metric]:
    """The per-value KPI gauges and what the guard did, from a worker's merged fold; ``kept``:
    the fleet's kept values (without them, or where they decide nothing, ranked here)."""
    if not config.dimensions:
        return
    found = dimension_kpis(config, fold.counters.get(agg.DIMENSION, {}), kept)
    deals_open, open_value, reached, closed, cycle, won = (
        GaugeMetricFamily(name, doc, labels=(*_KEY, *labels)) for name, doc, labels in _KPIS)
    distinct, folded, limit, fleet = (GaugeMetricFamily(name, doc, labels=("pipeline", "dimension"))
                                      for name, doc in _GUARD)
    rows = 0
    for (pl, name), kpis in found.items():
        pipeline = config.pipelines[pl]
        opens = [stage.name for stage in pipeline.open_stages]
        for value, sums in kpis.values.items():
            key = (pl, name, value)
            reached_counts = sums.reached(pipeline)
            for stage in opens:
                deals_open.add_metric((*key, stage), sums.open.get(stage, 0))
                reached.add_metric((*key, stage), reached_counts[stage])
                for currency in kpis.currencies:
                    open_value.add_metric((*key, stage, currency),
                                          sums.open_value.get((stage, currency), 0) / agg.MICRO)
            for outcome in agg.OUTCOMES:
                cycle.add_metric((*key, outcome), sums.cycle_ms.get(outcome, 0) / 1000)
                for currency in kpis.currencies:
                    closed.add_metric((*key, outcome, currency), sums.closed.get((outcome, currency), 0))
            for currency in kpis.currencies:
                won.add_metric((*key, currency), sums.won.get(currency, 0) / agg.MICRO)
        rows += len(kpis.values) * pipeline.dimension_series(len(kpis.currencies))
        distinct.add_metric((pl, name), kpis.distinct)
        folded.add_metric((pl, name), kpis.folded)
        limit.add_metric((pl, name), kpis.limit)
        fleet.add_metric((pl, name), int(kpis.fleet))
    series = GaugeMetricFamily("funnel_dimension_series",
                               "Series of the funnel_dimension_* KPI gauges this worker exports")
    series.add_metric((), rows)
    yield from (deals_open, open_value, reached, closed, cycle, won, distinct, folded, limit, fleet, series)
