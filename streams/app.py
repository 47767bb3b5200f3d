"""The Faust worker: topics, the ``deals`` and ``customers`` tables, thin agents, ``/metrics``.

Flow: ``crm.events`` → deal agent (decode, map stage, state machine; :mod:`streams.processor`)
→ ``deals`` table + per-partition folds → ``/metrics``; won credits re-keyed by account →
customer agent → ``customers`` table + folds → ``/metrics``. Invalid input → ``crm.events.dlq``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import faust
import orjson
from faust.types import TP
from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics, generate_latest
from prometheus_client.process_collector import ProcessCollector

from models.aggregates import Contribution
from models.alerts import Alert
from models.config import FunnelConfig, load_config
from sinks.prometheus import REJECTION_REASONS, SINKS, KpiCollector, ProcessMetrics
from sinks.redis import RedisSink
from streams import topics
from streams.api import SnapshotFeed, register_api
from streams.outbox import Outbox, in_event_context
from streams.processor import (
    CustomerProcessor,
    DealProcessor,
    EventClock,
    PartitionFolds,
    Record,
    Rejection,
)
from streams.publisher import KpiPublisher, encode_partial
from streams.settings import Settings

log = logging.getLogger("funnel_kpi")
# Prometheus text format 0.0.4; aiohttp adds the charset itself.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
# DLQ copies of oversized messages are cut to this (brokers refuse > 1 MB by default).
DLQ_MAX_VALUE = 64 * 1024
disable_created_metrics()

try:
    VERSION = version("funnel-kpi")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+source"


class RawTable(faust.Table):
    """A table of bytes keys and values, written to its changelog as they are.

    Faust derives serializers from model types and falls back to JSON; our values are already
    compact bytes (models.deal), so JSON would only wrap them.
    """

    def __init__(self, app: faust.App, settings: Settings, **kwargs: Any) -> None:
        # RocksDB memory per table partition: block cache + 2 write buffers (Faust's defaults
        # are a 2 GiB cache and 3 × 64 MiB buffers per partition: far too much for small boxes).
        mib = 1024 * 1024
        options = {
            "block_cache_size": settings.rocksdb_block_cache_mb * mib,
            "write_buffer_size": settings.rocksdb_write_buffer_mb * mib,
            "max_write_buffer_number": 2,
        } if settings.store.startswith("rocksdb") else None
        super().__init__(app, key_type=bytes, value_type=bytes, beacon=app.tables.beacon,
                         default=None, options=options, **kwargs)
        self.key_serializer = self.value_serializer = "raw"


class ErasureTable(RawTable):
    """Pseudonyms of erased people; loaded into the deal processor once recovered, so an
    erasure survives restarts and rebalances."""

    def __init__(self, app: faust.App, settings: Settings, erased: set[str], **kwargs: Any) -> None:
        super().__init__(app, settings, **kwargs)
        self.erased = erased

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        self.erased |= {key.decode() for key in list(self.data.keys())}


class FoldedTable(RawTable):
    """A table whose values feed in-memory folds of the actively owned partitions only.

    Folds are dropped when partitions are revoked and rebuilt from the table once recovery
    completes, so standby replicas (also in this table's store) are never exported.
    """

    def __init__(
        self, app: faust.App, settings: Settings, *, folds: PartitionFolds, source_topic: str,
        contribution: Callable[[bytes], tuple[int, Contribution]],
        on_ready: Callable[[set[int], set[int]], None], **kwargs: Any,
    ) -> None:
        super().__init__(app, settings, **kwargs)
        self.folds = folds
        self.source_topic = source_topic
        self.contribution = contribution
        self.on_ready = on_ready

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP], generation_id: int = 0
    ) -> None:
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)
        self.folds.revoke(tp.partition for tp in revoked if tp.topic == self.source_topic)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        active = {
            tp.partition for tp in self.app.assignor.assigned_actives()
            if tp.topic == self.source_topic
        }
        standby = {
            tp.partition for tp in self.app.assignor.assigned_standbys()
            if tp.topic == self.changelog_topic.get_topic_name()
        }
        self.folds.rebuild(active, self._stored_contributions())
        log.info("%s: aggregates rebuilt for active partitions %s (standby %s, not exported)",
                 self.name, sorted(active), sorted(standby))
        self.on_ready(active, standby)

    def _stored_contributions(self) -> Iterator[tuple[int, Contribution]]:
        for value in self.data.values():
            if value is not None:
                yield self.contribution(value)


@dataclass
class Worker:
    app: faust.App
    settings: Settings
    config: FunnelConfig
    registry: CollectorRegistry
    deals: DealProcessor
    customers: CustomerProcessor


def _faust_app(settings: Settings) -> faust.App:
    heartbeat = min(3.0, settings.session_timeout / 3)
    return faust.App(
        settings.app_id,
        broker=settings.broker,
        store=settings.store,
        datadir=str(settings.data_dir),
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        table_standby_replicas=settings.standby_replicas,
        recovery_consistency_check=settings.recovery_consistency_check,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout,
        broker_rebalance_timeout=settings.rebalance_timeout,
        broker_heartbeat_interval=heartbeat,
        broker_request_timeout=max(30.0, settings.session_timeout + 5),
        stream_buffer_maxsize=max(4096, settings.batch_size * 2),
        producer_linger_ms=5,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_tables_enabled=False,
        web_router_enabled=False,
        web_metrics_enabled=False,
        logging_config=None,
    )


def create_worker(settings: Settings | None = None) -> Worker:
    settings = settings or Settings()
    config = load_config(settings.config)
    clock = EventClock(settings.clock or config.clock)
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    metrics = ProcessMetrics(registry)
    metrics.seed(sorted(config.sources | {"other", "unknown"}), REJECTION_REASONS, SINKS)
    def scan_partition(partition: int) -> Iterator[tuple[str, bytes]]:
        for key, value in list(deals.data.items()):
            if value is not None and orjson.loads(value)[2] == partition:
                yield key.decode(), value

    deal_processor = DealProcessor(
        config, clock, metrics, max_skew_ms=int(settings.max_future_skew * 1000),
        ticks_topic=topics.ticks_topic(settings.app_id), scan=scan_partition,
    )
    customer_processor = CustomerProcessor()
    app = _faust_app(settings)
    consumer_lag = Gauge(
        "funnel_consumer_lag_messages", "Messages behind the end of the partition",
        ["topic", "partition"], registry=registry,
    )

    def raw_topic(*names: str, partitions: int = settings.partitions, **kwargs: Any) -> faust.TopicT:
        return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw",
                         value_serializer="raw", partitions=partitions, **kwargs)

    events_topic = raw_topic(topics.EVENTS, topics.ticks_topic(settings.app_id))
    ticks_topic = raw_topic(topics.ticks_topic(settings.app_id), internal=True)
    partials_topic = raw_topic(topics.partials_topic(settings.app_id), partitions=1, internal=True)
    publisher = KpiPublisher(config, settings.partitions, VERSION)
    publisher_state = app.tables.add(RawTable(app, settings, name="publisher", partitions=1))
    feed = SnapshotFeed()
    redis_sink = (
        RedisSink(settings.redis_url, metrics.sink_errors.labels("redis").inc)
        if settings.redis_url else None
    )
    credits_topic = raw_topic(topics.credits_topic(settings.app_id), internal=True)
    ready_parts: dict[str, bool] = {}

    def table(name: str, folds: PartitionFolds, source: str,
              contribution: Callable[[bytes], tuple[int, Contribution]]) -> FoldedTable:
        def on_ready(active: set[int], standby: set[int]) -> None:
            ready_parts[name] = True
            if name == "deals":
                metrics.active_partitions.set(len(active))
                metrics.standby_partitions.set(len(standby))
            metrics.ready.set(1 if all(ready_parts.values()) else 0)

        ready_parts[name] = False
        return app.tables.add(FoldedTable(
            app, settings, name=name, folds=folds, source_topic=source, contribution=contribution,
            on_ready=on_ready, partitions=settings.partitions,
        ))

    deals = table("deals", deal_processor.folds, topics.EVENTS,
                  deal_processor.contribution_of_stored)
    erasures = app.tables.add(ErasureTable(app, settings, deal_processor.erased, name="erasures",
                                           partitions=settings.partitions))
    customers = table("customers", customer_processor.folds, credits_topic.get_topic_name(),
                      customer_processor.contribution_of_stored)

    @app.on_partitions_revoked.connect
    async def _not_ready(app: faust.App, revoked: set[TP], **_: Any) -> None:
        for name in ready_parts:
            ready_parts[name] = False
        metrics.ready.set(0)
        metrics.rebalances.inc()
        metrics.publisher.set(0)
        publisher.revoked()

    def read(table_: RawTable) -> Callable[[str, Record], bytes | None]:
        def load(key: str, record: Record) -> bytes | None:
            return in_event_context(record.ref, lambda: table_.data.get(key.encode()))
        return load

    def outbox() -> Outbox:
        return Outbox(app, lambda sink: metrics.sink_errors.labels(sink).inc())

    def to_records(events: list[Any]) -> list[Record]:
        return [
            Record(e.message.key, e.message.value, e.message.topic, e.message.partition,
                   e.message.offset, e)
            for e in events
        ]

    def report_lag(records: list[Record]) -> None:
        if not records:
            return
        last: dict[int, int] = {}
        for record in records:
            last[record.partition] = record.offset
        for partition, offset in last.items():
            tp = TP(records[0].topic, partition)
            lag = app.consumer.highwater(tp) - offset - 1
            consumer_lag.labels(tp.topic, str(partition)).set(max(lag, 0))

    def to_dlq(out: Outbox, rejection: Rejection) -> None:
        record = rejection.record
        value = record.value or b""
        headers = [
            ("funnel.reason", rejection.reason.encode()),
            ("funnel.reason.code", rejection.code.encode()),
            ("funnel.source.topic", record.topic.encode()),
            ("funnel.source.partition", str(record.partition).encode()),
            ("funnel.source.offset", str(record.offset).encode()),
        ]
        if len(value) > DLQ_MAX_VALUE:  # the whole message stays in crm.events at that offset
            headers.append(("funnel.original.size", str(len(value)).encode()))
            value = value[:DLQ_MAX_VALUE]
        out.send(topics.DLQ, record.key, value, headers=headers, sink="dlq")
        metrics.dlq.inc()

    @app.agent(events_topic, name="deal-agent")
    async def deal_agent(stream: faust.StreamT) -> None:
        out = outbox()
        async for events in stream.take_events(settings.batch_size, settings.batch_within):
            records = to_records(events)
            batch = deal_processor.process(records, read(deals))
            for deal_id, value, record in batch.writes:
                out.put(deals, deal_id, value, record.ref)
            for pseudonym, record in batch.erased:
                out.put(erasures, pseudonym, b"1", record.ref)
            for rejection in batch.rejections:
                to_dlq(out, rejection)
            for credit in batch.credits:
                out.send(credits_topic.get_topic_name(), credit.account.encode(), credit.encode(),
                         sink="credits")
            for alert in batch.alerts:
                send_alert(out, alert)
            await out.flush()
            report_lag([r for r in records if r.topic == topics.EVENTS])

    def send_alert(out: Outbox, alert: Alert) -> None:
        if redis_sink is not None:
            redis_sink.alert(alert)
        out.send(topics.ALERTS, (alert.deal_id or alert.pipeline).encode(),
                 alert.model_dump_json(exclude_none=True).encode(), sink="alerts")

    @app.timer(interval=settings.tick_interval)
    async def tick() -> None:
        """Ask the deal agent of each owned partition to check stalls (it may write the table),
        and publish each owned partition's partial for the KPI publisher."""
        now = clock.now_ms()
        for kind, folds in (("deals", deal_processor.folds), ("customers", customer_processor.folds)):
            for partition, fold in list(folds.folds.items()):
                if kind == "deals":
                    await ticks_topic.send(value=b"tick", partition=partition)
                await partials_topic.send(
                    key=f"{kind}:{partition}".encode(), partition=0,
                    value=encode_partial(kind, partition, now, config, fold),
                )

    @app.agent(partials_topic, name="kpi-publisher")
    async def kpi_publisher(stream: faust.StreamT) -> None:
        out = outbox()
        async for events in stream.take_events(settings.batch_size, settings.batch_within):
            published = publisher.process(to_records(events), read(publisher_state))
            metrics.publisher.set(1)
            for key, value, record in published.writes:
                out.put(publisher_state, key, value, record.ref)
            for alert in published.alerts:
                send_alert(out, alert)
            for snapshot in published.snapshots:
                out.send(topics.KPIS, snapshot.pipeline.encode(),
                         snapshot.model_dump_json().encode(), sink="kpis")
            await out.flush()
            if redis_sink is not None:
                for snapshot in published.snapshots:
                    redis_sink.snapshot(snapshot)

    @app.task
    async def follow_snapshots() -> None:
        await feed.follow(settings.broker)

    if redis_sink is not None:
        @app.task
        async def write_redis() -> None:
            await redis_sink.run()

    register_api(app, feed, pipelines=list(config.pipelines),
                 ready=lambda: bool(ready_parts) and all(ready_parts.values()),
                 token=settings.api_token)

    @app.agent(credits_topic, name="customer-agent")
    async def customer_agent(stream: faust.StreamT) -> None:
        out = outbox()
        async for events in stream.take_events(settings.batch_size, settings.batch_within):
            for account, value, record in customer_processor.process(
                to_records(events), read(customers)
            ):
                out.put(customers, account, value, record.ref)
            await out.flush()

    collector = KpiCollector(
        config,
        lambda: [*deal_processor.folds.folds.values(), *customer_processor.folds.folds.values()],
        clock.now_ms, VERSION,
    )
    registry.register(collector)

    @app.page("/metrics")
    async def metrics_view(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.bytes(generate_latest(registry), content_type=METRICS_CONTENT_TYPE)

    return Worker(app, settings, config, registry, deal_processor, customer_processor)
