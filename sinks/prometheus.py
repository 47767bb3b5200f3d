"""Prometheus exposition of the KPIs (docs/design.md §3).

Business KPIs are gauges computed at scrape time from the folds of actively owned partitions
(:class:`KpiCollector`); process metrics are in :mod:`sinks.process_metrics`. Every known label
combination is exported, zero included, so an absent series never hides a zero; a worker
exports them once it has rebuilt the folds of a partition (:class:`WorkerKpiCollector`), so an
absent series means "not known yet", never 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from models import aggregates as agg
from models.config import FunnelConfig
from models.fleet_values import KeptValues
from models.fold import Fold
from models.hourly import hourly_totals
from models.periods import PERIODS, period_first_hours
from models.rates import RateBook
from sinks.config_gauges import config_gauges
from sinks.dimensions import dimension_gauges
from sinks.open_deals import currencies, open_deal_gauges
from sinks.quotas import quota_owners, rep_period_gauge
from sinks.reporting import reporting_gauges


@dataclass(frozen=True)
class _Gauge:
    name: str
    doc: str
    family: str
    labels: tuple[str, ...]
    scale: float = 1.0


_GAUGES = (
    _Gauge("funnel_deals_open", "Deals currently in the stage", agg.OPEN, ("pipeline", "stage")),
    _Gauge("funnel_open_value", "Amounts of deals currently in the stage", agg.OPEN_VALUE,
           ("pipeline", "stage", "currency"), 1 / agg.MICRO),
    _Gauge("funnel_deals_reached", "Deals that reached this open stage or a later one",
           agg.REACHED, ("pipeline", "stage")),
    _Gauge("funnel_deals_closed", "Deals currently closed, by outcome", agg.CLOSED,
           ("pipeline", "outcome")),
    _Gauge("funnel_won_revenue", "Amounts of won deals", agg.WON_REVENUE,
           ("pipeline", "currency"), 1 / agg.MICRO),
    _Gauge("funnel_rep_won_revenue", "Won amounts per sales rep (owner at close)", agg.REP_WON,
           ("pipeline", "owner", "currency"), 1 / agg.MICRO),
    _Gauge("funnel_customers", "Accounts with at least one won deal", agg.CUSTOMERS, ("pipeline",)),
)
_HISTOGRAMS = (
    _Gauge("funnel_won_deal_value", "Distribution of won deal amounts", agg.WON_VALUE,
           ("pipeline", "currency"), 1 / agg.MICRO),
    _Gauge("funnel_time_to_close_seconds", "First stage entry to close, closed deals",
           agg.TIME_TO_CLOSE, ("pipeline", "outcome"), 1 / 1000),
    _Gauge("funnel_stage_duration_seconds", "Completed stays in a stage", agg.STAGE_DURATION,
           ("pipeline", "stage"), 1 / 1000),
    _Gauge("funnel_customer_lifetime_value", "Won revenue per customer", agg.CLV,
           ("pipeline", "currency"), 1 / agg.MICRO),
)
_WINDOWED = (
    _Gauge("funnel_deals_reached_window", "Deals that reached the stage within the window",
           agg.REACHED_W, ("pipeline", "stage")),
    _Gauge("funnel_deals_closed_window", "Deals closed within the window", agg.CLOSED_W,
           ("pipeline", "outcome")),
    _Gauge("funnel_won_revenue_window", "Amounts of deals won within the window",
           agg.WON_REVENUE_W, ("pipeline", "currency"), 1 / agg.MICRO),
)
_WINDOWED_HIST = _Gauge(
    "funnel_time_to_close_window_seconds", "Cycle of deals closed within the window",
    agg.TIME_TO_CLOSE_W, ("pipeline", "outcome"), 1 / 1000,
)


def _bucket_bounds(family: str, scale: float) -> list[str]:
    return [f"{bound * scale:g}" for bound in agg.BUCKETS[family]] + ["+Inf"]


class KpiCollector(Collector):
    """Gauges of the current deal states of the partitions this worker actively owns."""

    def __init__(
        self, config: FunnelConfig, folds: Callable[[], list[Fold]], now_ms: Callable[[], int],
        version: str, rates: RateBook | None = None, kept: KeptValues | None = None,
    ) -> None:
        self.config = config
        self.folds = folds
        self.now_ms = now_ms
        self.version = version
        self.rates = rates  # None: no funnel_reporting_* gauges (the publisher's partials)
        self.kept = kept  # the fleet's kept dimension values; None: each ranks its own
        self._seeds = self._known_keys()

    def _known_keys(self) -> dict[str, list[tuple]]:
        """Every label combination known from config, exported as 0 when empty."""
        seeds: dict[str, list[tuple]] = {}
        for name, pipeline in self.config.pipelines.items():
            currencies = {self.config.default_currency} | set(self.config.targets.get(name, {}))
            opens = [stage.name for stage in pipeline.open_stages]
            for family in (agg.OPEN, agg.REACHED, agg.REACHED_W):
                seeds.setdefault(family, []).extend((name, stage) for stage in opens)
            seeds.setdefault(agg.STAGE_DURATION, []).extend((name, stage) for stage in opens)
            for family in (agg.CLOSED, agg.CLOSED_W, agg.TIME_TO_CLOSE, agg.TIME_TO_CLOSE_W):
                seeds.setdefault(family, []).extend((name, o) for o in agg.OUTCOMES)
            seeds.setdefault(agg.CUSTOMERS, []).append((name,))
            for currency in sorted(currencies):
                seeds.setdefault(agg.OPEN_VALUE, []).extend((name, s, currency) for s in opens)
                for family in (agg.WON_REVENUE, agg.WON_REVENUE_W, agg.WON_VALUE, agg.CLV):
                    seeds.setdefault(family, []).append((name, currency))
        return seeds

    def collect(self) -> Iterator[Metric]:
        folds = self.folds()
        now_ms = self.now_ms()
        yield from config_gauges(self.config, self.version, now_ms)
        yield from self._kpis(folds, now_ms)

    def _kpis(self, folds: list[Fold], now_ms: int) -> Iterator[Metric]:
        fold = Fold()
        for part in folds:
            fold.merge(part, skip=agg.HOURLY)
        for spec in _GAUGES:
            values = fold.counters.get(spec.family, {})
            metric = GaugeMetricFamily(spec.name, spec.doc, labels=spec.labels)
            for key in self._keys(spec.family, values):
                metric.add_metric(key, values.get(key, 0) * spec.scale)
            yield metric
        for spec in _HISTOGRAMS:
            yield self._histogram(spec, fold.hists.get(spec.family, {}), None)
        yield from self._windowed(folds, now_ms)
        yield from open_deal_gauges(self.config, folds, now_ms)
        yield self._won_in_period(folds, now_ms)
        yield from dimension_gauges(self.config, fold, self.kept)
        yield rep_period_gauge(self.config, folds, now_ms)
        yield from reporting_gauges(self.config, self.rates, folds, fold, now_ms, quota_owners(self.config))

    def _keys(self, family: str, values: dict) -> list[tuple]:
        seeded = self._seeds.get(family, [])
        return seeded + sorted(set(values) - set(seeded))

    def _histogram(self, spec: _Gauge, hists: dict, window: str | None) -> Metric:
        labels = spec.labels + (("window",) if window else ())
        metric = GaugeHistogramMetricFamily(spec.name, spec.doc, labels=labels)
        bounds = _bucket_bounds(spec.family, spec.scale)
        for key in self._keys(spec.family, hists):
            hist = hists.get(key)
            counts = hist.counts if hist else [0] * len(bounds)
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            total = hist.total * spec.scale if hist else 0.0
            metric.add_metric(list(key) + ([window] if window else []), cumulative, total)
        return metric

    def _windowed(self, folds: list[Fold], now_ms: int) -> Iterator[Metric]:
        now_hour = now_ms // agg.HOUR_MS
        ranges = agg.window_ranges(now_hour)
        for spec in _WINDOWED:
            metric = GaugeMetricFamily(spec.name, spec.doc, labels=(*spec.labels, "window"))
            sums = hourly_totals(folds, spec.family, ranges, now_hour)
            for key in self._keys(spec.family, {k: 0 for w in sums.values() for k in w}):
                for window in agg.WINDOWS:
                    metric.add_metric([*key, window], sums[window].get(key, 0) * spec.scale)
            yield metric
        merged = hourly_totals(folds, _WINDOWED_HIST.family, ranges, now_hour)
        metric = None
        for window in agg.WINDOWS:
            part = self._histogram(_WINDOWED_HIST, merged[window], window)
            if metric is None:
                metric = part
            else:
                metric.samples.extend(part.samples)
        yield metric

    def _won_in_period(self, folds: list[Fold], now_ms: int) -> Metric:
        metric = GaugeMetricFamily(
            "funnel_won_revenue_period", "Won in the current calendar period (business timezone)",
            labels=("pipeline", "currency", "period"))
        now_hour = now_ms // agg.HOUR_MS
        ranges = period_first_hours(now_ms, self.config.zone, self.config.fiscal_year_start_month)
        sums = hourly_totals(folds, agg.WON_REVENUE_W, ranges, now_hour)
        for name in self.config.pipelines:
            for period in PERIODS:
                won = sums[period]
                seen = {currency for pl, currency in won if pl == name}
                for currency in sorted(set(currencies(self.config, name)) | seen):
                    metric.add_metric((name, currency, period),
                                      won.get((name, currency), 0) / agg.MICRO)
        return metric


def current_partitions(*tables: dict[int, Fold]) -> dict[int, list[Fold]]:
    """The folds of each partition present in every table's folds (a table's folds hold only
    partitions rebuilt for the present assignment; a partition's tables move together)."""
    shared = set.intersection(*(set(folds) for folds in tables))
    return {partition: [folds[partition] for folds in tables] for partition in shared}


class WorkerKpiCollector(KpiCollector):
    """A worker's /metrics: the KPI gauges of exactly the partitions it lists in
    ``funnel_partition_exported``, and no KPI gauge at all (not even zeros) while it has none.

    ``exported`` returns the folds of the partitions whose folds are current (rebuilt for the
    present assignment), by partition. One call per scrape, so the partition list and the
    gauges of a scrape always agree: the recording rules sum a KPI only while every partition
    is listed exactly once across the fleet (prometheus/rules/funnel_recording.yml), and a
    rebalance shows as a gap, never as a partial sum (the boards read the ``_held`` twins, which
    keep the last complete value for at most 120 s).
    """

    def __init__(
        self, config: FunnelConfig, exported: Callable[[], dict[int, list[Fold]]],
        now_ms: Callable[[], int], version: str, partitions: int, rates: RateBook | None = None,
        kept: KeptValues | None = None,
    ) -> None:
        super().__init__(config, lambda: [], now_ms, version, rates, kept)
        self.exported = exported
        self.partitions = partitions

    def collect(self) -> Iterator[Metric]:
        exported = self.exported()
        now_ms = self.now_ms()
        yield from config_gauges(self.config, self.version, now_ms)
        count = GaugeMetricFamily("funnel_partitions",
                                  "Partitions of crm.events and the internal topics (config)")
        count.add_metric((), self.partitions)
        listed = GaugeMetricFamily(
            "funnel_partition_exported",
            "1 for each partition whose KPIs this worker exports (folds rebuilt and current)",
            labels=("partition",))
        for partition in sorted(exported):
            listed.add_metric((str(partition),), 1)
        yield from (count, listed)
        if exported:
            yield from self._kpis([fold for folds in exported.values() for fold in folds], now_ms)
