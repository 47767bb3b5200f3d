"""The worker's process metrics: plain prometheus-client counters, gauges and histograms,
reset on restart as usual (business KPIs are gauges computed at scrape time:
:mod:`sinks.prometheus`)."""

from __future__ import annotations

import bisect
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from models.deal import Outcome

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
        self.consumer_lag = Gauge(
            "funnel_consumer_lag_messages", "Messages behind the end of the partition",
            ["topic", "partition"], registry=registry,
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
        self.failed_batches.labels("loop")  # the one batch loop


SINKS = ["dlq", "credits", "kpis", "alerts", "redis"]
REJECTION_REASONS = ["empty", "too_large", "invalid_json", "invalid_event", "future_timestamp",
                     "ancient_timestamp", "unknown_pipeline", "unmapped_stage", "wrong_partition"]
