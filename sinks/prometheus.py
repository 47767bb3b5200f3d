"""Prometheus exposition (docs/design.md §3).

Business KPIs are gauges computed at scrape time from the folds of actively owned partitions
(:class:`KpiCollector`); process metrics are plain prometheus-client counters and histograms
(:class:`ProcessMetrics`). Every known label combination is exported, zero included, so an
absent series never hides a zero; a worker exports them once it has rebuilt the folds of a
partition (:class:`WorkerKpiCollector`), so an absent series means "not known yet", never 0.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from models import aggregates as agg
from models.config import FunnelConfig
from models.deal import Outcome
from models.periods import PERIODS, elapsed_ratio, period_bounds

disable_created_metrics()  # *_created series add nothing for these counters
LAG_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400,
               7 * 86400, 30 * 86400, 365 * 86400)


def _observe_ms(histogram: Histogram, values_ms: list[int]) -> None:
    """``histogram.observe(max(v, 0) / 1000)`` for every value, one update per bucket.

    prometheus-client has no bulk observe; a labelled histogram keeps its per-bucket
    (non-cumulative) counts in ``_buckets``, bounds in ``_upper_bounds`` and the sum in ``_sum``.
    """
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    total = 0.0
    for value in values_ms:
        seconds = value / 1000 if value > 0 else 0.0
        counts[bisect.bisect_left(bounds, seconds)] += 1
        total += seconds
    histogram._sum.inc(total)
    for bucket, n in zip(histogram._buckets, counts, strict=True):
        if n:
            bucket.inc(n)


class ProcessMetrics:
    """Per-process counters; reset on restart as usual."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "funnel_events", "CRM events handled, by source and outcome",
            ["source", "outcome"], registry=registry,
        )
        self.rejections = Counter(
            "funnel_events_rejected", "Events sent to the DLQ, by reason",
            ["reason"], registry=registry,
        )
        self.lag = Histogram(
            "funnel_event_lag_seconds", "Processing time minus occurred_at of accepted events",
            ["source"], buckets=LAG_BUCKETS, registry=registry,
        )
        self.dlq = Counter(
            "funnel_dlq_messages", "Messages written to crm.events.dlq", registry=registry
        )
        self.sink_errors = Counter(
            "funnel_sink_errors", "Failed writes to an output (dlq, credits, kpis, alerts, redis)",
            ["sink"], registry=registry,
        )
        self.ready = Gauge(
            "funnel_worker_ready", "1 once table recovery finished and partitions are served",
            registry=registry,
        )
        self.broker_ack_age = Gauge(
            "funnel_broker_ack_age_seconds",
            "Seconds since the broker last acknowledged a write or answered a probe",
            registry=registry,
        )
        self.rebalances = Counter(
            "funnel_rebalances", "Partition rebalances seen by this worker", registry=registry
        )
        self.active_partitions = Gauge(
            "funnel_active_partitions", "Partitions of crm.events this worker actively owns",
            registry=registry,
        )
        self.publisher = Gauge(
            "funnel_kpi_publisher", "1 on the one worker that publishes KPI snapshots",
            registry=registry,
        )
        self.standby_partitions = Gauge(
            "funnel_standby_partitions", "Standby copies of deal partitions held (never exported)",
            registry=registry,
        )
        self.clock = Gauge(
            "funnel_clock_timestamp_seconds",
            "The time windows, periods and stalls are computed at (wall or fleet stream clock)",
            registry=registry,
        )
        self.failed_batches = Counter(
            "funnel_failed_batches", "Batches that failed and were taken back, to be read again",
            ["agent"], registry=registry,
        )
        self._events_children: dict[tuple[str, str], Callable[[float], None]] = {}

    def counted(self, outcomes: dict[tuple[str, Outcome], int], lags: dict[str, list[int]]) -> None:
        """A batch's events by (source, outcome) and the lags (ms) of its accepted events, by
        source: one update per label set and bucket (each update takes a lock; per event, they
        were ~10 % of the hot path)."""
        for (source, outcome), n in outcomes.items():
            key = (source, outcome.value)
            inc = self._events_children.get(key)
            if inc is None:
                inc = self._events_children[key] = self.events.labels(source, outcome.value).inc
            inc(n)
        for source, values in lags.items():
            _observe_ms(self.lag.labels(source), values)

    def rejected(self, source: str, code: str) -> None:
        self.events.labels(source, Outcome.REJECTED.value).inc()
        self.rejections.labels(code).inc()

    def seed(self, sources: list[str], reasons: list[str], sinks: list[str]) -> None:
        for source in sources:
            for outcome in Outcome:
                self.events.labels(source, outcome.value)
        for reason in reasons:
            self.rejections.labels(reason)
        for sink in sinks:
            self.sink_errors.labels(sink)
        for agent in FAILING_AGENTS:
            self.failed_batches.labels(agent)


# Gauges that come from the config and the clock, identical on every worker (aggregate with max).
CONFIG_METRICS = frozenset({
    "funnel_stage_probability", "funnel_stage_index", "funnel_stall_after_seconds",
    "funnel_stage_info", "funnel_revenue_target", "funnel_period_elapsed_ratio",
    "funnel_build_info", "funnel_partitions", "funnel_owner_info",
})
FAILING_AGENTS = ["events", "ticks", "customers"]
SINKS = ["dlq", "credits", "kpis", "alerts", "redis"]
REJECTION_REASONS = ["empty", "too_large", "invalid_json", "invalid_event", "future_timestamp",
                     "ancient_timestamp", "unknown_pipeline", "unmapped_stage", "wrong_partition"]


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
        self, config: FunnelConfig, folds: Callable[[], list[agg.Fold]], now_ms: Callable[[], int],
        version: str,
    ) -> None:
        self.config = config
        self.folds = folds
        self.now_ms = now_ms
        self.version = version
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
        yield from self._config_gauges(now_ms)
        yield from self._kpis(folds, now_ms)

    def _kpis(self, folds: list[agg.Fold], now_ms: int) -> Iterator[Metric]:
        fold = agg.Fold()
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
        yield from self._open_deal_gauges(folds, now_ms)
        yield self._won_in_period(folds, now_ms)

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

    def _windowed(self, folds: list[agg.Fold], now_ms: int) -> Iterator[Metric]:
        now_hour = now_ms // agg.HOUR_MS
        ranges = agg.window_ranges(now_hour)
        for spec in _WINDOWED:
            metric = GaugeMetricFamily(spec.name, spec.doc, labels=(*spec.labels, "window"))
            sums = agg.hourly_totals(folds, spec.family, ranges, now_hour)
            for key in self._keys(spec.family, {k: 0 for w in sums.values() for k in w}):
                for window in agg.WINDOWS:
                    metric.add_metric([*key, window], sums[window].get(key, 0) * spec.scale)
            yield metric
        merged = agg.hourly_totals(folds, _WINDOWED_HIST.family, ranges, now_hour)
        metric = None
        for window in agg.WINDOWS:
            part = self._histogram(_WINDOWED_HIST, merged[window], window)
            if metric is None:
                metric = part
            else:
                metric.samples.extend(part.samples)
        yield metric

    def _currencies(self, pipeline: str) -> list[str]:
        return sorted({self.config.default_currency} | set(self.config.targets.get(pipeline, {})))

    def _open_deal_gauges(self, folds: list[agg.Fold], now_ms: int) -> Iterator[Metric]:
        """Stalls and expected closes, scanned from the per-deal index of each partition."""
        stall_after = {
            (name, stage.name): stage.stall_after
            for name, pipeline in self.config.pipelines.items()
            for stage in pipeline.open_stages if stage.stall_after is not None
        }
        periods = {
            period: period_bounds(now_ms, self.config.zone, period) for period in PERIODS
        }
        stalled: dict[tuple, int] = {}
        at_risk: dict[tuple, int] = {}
        closing: dict[tuple, int] = {}
        unpack = agg.OPEN_DEAL.unpack
        for fold in folds:
            for (pl, stage, currency), group in fold.open_deals.items():
                before = agg.stalled_before(now_ms, stall_after.get((pl, stage)))
                stalled_n = at_risk_micro = 0
                closing_micro = dict.fromkeys(periods, 0.0)
                for packed in group.values():
                    entered, expected, micro, _ = unpack(packed)
                    if entered < before:
                        stalled_n += 1
                        at_risk_micro += micro
                    if expected != agg.NO_DATE:
                        for period, (start, end) in periods.items():
                            if start <= expected < end:
                                closing_micro[period] += micro
                if stalled_n:
                    stalled[(pl, stage)] = stalled.get((pl, stage), 0) + stalled_n
                    key = (pl, stage, currency)
                    at_risk[key] = at_risk.get(key, 0) + int(at_risk_micro)
                for period, micro in closing_micro.items():
                    if micro:
                        key = (pl, stage, currency, period)
                        closing[key] = closing.get(key, 0) + int(micro)
        count = GaugeMetricFamily("funnel_deals_stalled", "Open deals in the stage longer than "
                                  "its stall_after", labels=("pipeline", "stage"))
        value = GaugeMetricFamily("funnel_stalled_value", "Amounts of stalled deals (value at risk)",
                                  labels=("pipeline", "stage", "currency"))
        period_value = GaugeMetricFamily(
            "funnel_open_value_period",
            "Open amounts expected to close in the current calendar period",
            labels=("pipeline", "stage", "currency", "period"))
        for pl, stage in stall_after:
            count.add_metric((pl, stage), stalled.get((pl, stage), 0))
            for currency in self._currencies(pl):
                value.add_metric((pl, stage, currency), at_risk.get((pl, stage, currency), 0) / agg.MICRO)
        for name, pipeline in self.config.pipelines.items():
            for stage in pipeline.open_stages:
                for currency in self._currencies(name):
                    for period in PERIODS:
                        key = (name, stage.name, currency, period)
                        period_value.add_metric(key, closing.get(key, 0) / agg.MICRO)
        yield from (count, value, period_value)

    def _won_in_period(self, folds: list[agg.Fold], now_ms: int) -> Metric:
        metric = GaugeMetricFamily(
            "funnel_won_revenue_period", "Won in the current calendar period (business timezone)",
            labels=("pipeline", "currency", "period"))
        now_hour = now_ms // agg.HOUR_MS
        ranges = tuple((period, period_bounds(now_ms, self.config.zone, period)[0] // agg.HOUR_MS)
                       for period in PERIODS)
        sums = agg.hourly_totals(folds, agg.WON_REVENUE_W, ranges, now_hour)
        for name in self.config.pipelines:
            for period in PERIODS:
                won = sums[period]
                currencies = {currency for pl, currency in won if pl == name}
                for currency in sorted(set(self._currencies(name)) | currencies):
                    metric.add_metric((name, currency, period),
                                      won.get((name, currency), 0) / agg.MICRO)
        return metric

    def _config_gauges(self, now_ms: int) -> Iterator[Metric]:
        probability = GaugeMetricFamily(
            "funnel_stage_probability", "Configured win probability of a stage",
            labels=("pipeline", "stage"))
        index = GaugeMetricFamily(
            "funnel_stage_index", "Position of the stage in its pipeline (0 = first)",
            labels=("pipeline", "stage"))
        stall = GaugeMetricFamily(
            "funnel_stall_after_seconds", "Time in an open stage after which a deal is stalled",
            labels=("pipeline", "stage"))
        for name, pipeline in self.config.pipelines.items():
            for position, stage in enumerate(pipeline.stages):
                probability.add_metric((name, stage.name), stage.probability)
                index.add_metric((name, stage.name), position)
                if stage.stall_after is not None:
                    stall.add_metric((name, stage.name), stage.stall_after)
        info = GaugeMetricFamily(
            "funnel_stage_info", "Stage metadata: its funnel section (TOFU / MOFU / BOFU)",
            labels=("pipeline", "stage", "section"))
        for name, pipeline in self.config.pipelines.items():
            for stage in pipeline.stages:
                info.add_metric((name, stage.name, stage.section.upper()), 1)
        target = GaugeMetricFamily(
            "funnel_revenue_target", "Configured revenue target of the calendar period",
            labels=("pipeline", "period", "currency"))
        for name, per_currency in self.config.targets.items():
            for currency, periods in per_currency.items():
                for period, amount in periods.items():
                    target.add_metric((name, period, currency), amount)
        elapsed = GaugeMetricFamily(
            "funnel_period_elapsed_ratio", "Share of the current calendar period elapsed (clock)",
            labels=("period",))
        for period in PERIODS:
            elapsed.add_metric((period,), elapsed_ratio(now_ms, self.config.zone, period))
        build = GaugeMetricFamily("funnel_build_info", "Build of the worker", labels=("version",))
        build.add_metric((self.version,), 1)
        owners = GaugeMetricFamily(
            "funnel_owner_info", "Configured display name of a sales rep (owner id as in events)",
            labels=("owner", "name"))
        for owner, name in sorted(self.config.owners.items()):
            owners.add_metric((owner, name), 1)
        yield from (probability, index, stall, info, target, elapsed, build, owners)


def current_partitions(*tables: dict[int, agg.Fold]) -> dict[int, list[agg.Fold]]:
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
    rebalance shows as a gap, never as a partial sum.
    """

    def __init__(
        self, config: FunnelConfig, exported: Callable[[], dict[int, list[agg.Fold]]],
        now_ms: Callable[[], int], version: str, partitions: int,
    ) -> None:
        super().__init__(config, lambda: [], now_ms, version)
        self.exported = exported
        self.partitions = partitions

    def collect(self) -> Iterator[Metric]:
        exported = self.exported()
        now_ms = self.now_ms()
        yield from self._config_gauges(now_ms)
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
