"""The Faust worker: topics, tables and thin agents around the processors.

Flow: ``crm.events`` → events consumer (:mod:`streams.worker.events_consumer`, batches read beside
Faust's stream) → deal processor (decode, map stage, state machine; :mod:`streams.worker.processor`)
→ ``deals`` table + per-partition folds → ``/metrics``; won credits re-keyed by account →
customer agent → ``customers`` table + folds. Ticks (internal topic, co-partitioned: Faust
assigns the tables by it) drive stall alerts and erasures in the deal agent, one batch at a time
with the events; partials (one-partition topic) feed the single KPI publisher
(:mod:`streams.worker.publisher`) → ``funnel.kpis``, alerts, Redis. Invalid input → ``crm.events.dlq``.
Every agent writes through an :class:`~streams.worker.outbox.Outbox`, acknowledged per batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import faust
import orjson
from faust.types import TP
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.process_collector import ProcessCollector

from models.alerts import Alert
from models.config import load_config
from models.snapshot import KpiSnapshot
from sinks.prometheus import REJECTION_REASONS, SINKS, ProcessMetrics, WorkerKpiCollector, current_partitions
from sinks.redis import RedisSink
from streams.http.api import SnapshotFeed, register_api
from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.worker import faust_patches
from streams.worker.events_consumer import RETRY_SECONDS, EventsConsumer
from streams.worker.outbox import Outbox, Revoked, in_partition
from streams.worker.processor import (
    CustomerProcessor,
    DealBatch,
    DealProcessor,
    EventClock,
    Record,
    Rejection,
    is_erasure,
)
from streams.worker.publisher import MAX_CHECK_LAG, KpiPublisher, encode_partial
from streams.worker.tables import ErasureTable, FoldedTable, RawTable, Rebalances

log = logging.getLogger("funnel_kpi")
# Prometheus text format 0.0.4; aiohttp adds the charset itself.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
# DLQ copies of oversized messages are cut to this (brokers refuse > 1 MB by default).
DLQ_MAX_VALUE = 64 * 1024
# /readyz says "broker unreachable" after max(3 ticks, this) seconds without a broker answer.
BROKER_SILENCE_MIN_S = 30.0

try:
    VERSION = version("funnel-kpi")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+source"


def _faust_app(settings: Settings) -> faust.App:
    faust_patches.apply(settings.fetch_max_wait_ms)
    heartbeat = min(3.0, settings.session_timeout / 3)
    return faust.App(
        settings.app_id,
        **kafka_client.faust_args(settings.broker),
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


def _records(events: list[Any]) -> list[Record]:
    return [
        Record(e.message.key, e.message.value, e.message.topic, e.message.partition, e.message.offset)
        for e in events
    ]


def _reader(table: RawTable) -> Callable[[str, Record], bytes | None]:
    get = table.data.get

    def load(key: str, record: Record) -> bytes | None:
        return in_partition(record.partition, get, key.encode())
    return load


class FunnelWorker:
    """One worker process: build it, then run ``self.app`` with a Faust worker."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings = settings or Settings()
        self.config = config = load_config(settings.config)
        self.clock = EventClock(settings.clock or config.clock)
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.registry.register(faust_patches.PatchCalls())
        self.metrics = ProcessMetrics(self.registry)
        self.metrics.seed(sorted(config.sources | {"other", "unknown"}), REJECTION_REASONS, SINKS)
        self.consumer_lag = Gauge(
            "funnel_consumer_lag_messages", "Messages behind the end of the partition",
            ["topic", "partition"], registry=self.registry,
        )
        self.deal_processor = DealProcessor(
            config, self.clock, self.metrics, max_skew_ms=int(settings.max_future_skew * 1000),
            min_occurred_ms=int(settings.min_occurred_at.timestamp() * 1000),
            ticks_topic=topics.ticks_topic(settings.app_id), scan=self._scan_partitions,
            max_stalls_per_tick=settings.stall_alerts_per_tick,
        )
        self.customer_processor = CustomerProcessor()
        self.publisher = KpiPublisher(config, settings.partitions, VERSION)
        self.feed = SnapshotFeed(on_accepted=self._fleet_clock)
        self.redis = (RedisSink(settings.redis_url.get_secret_value(),
                                self.metrics.sink_errors.labels("redis").inc)
                      if settings.redis_url else None)
        self.app = _faust_app(settings)
        self.ready_parts: dict[str, bool] = {}
        self.broker_answered_at = time.monotonic()
        self.metrics.broker_ack_age.set_function(lambda: time.monotonic() - self.broker_answered_at)
        self.metrics.clock.set_function(lambda: self.clock.now_ms() / 1000)
        self.active_partitions: set[int] = set()
        # Events batches and ticks both write the deals table: one at a time.
        self.deals_lock = asyncio.Lock()
        self.deals_out = self._outbox()
        self.events = EventsConsumer(self.app, settings, self.consumer_lag, self.handle_events,
                                     on_lost=self._stop_serving)
        self._declare_topics()
        self._declare_tables()
        self._declare_agents()
        self._declare_web()

    # -- declarations -----------------------------------------------------------------------

    def _topic(self, name: str, partitions: int | None = None, **kwargs: Any) -> faust.TopicT:
        return self.app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                              value_serializer="raw",
                              partitions=partitions or self.settings.partitions,
                              config=topics.topic_configs(name, self.settings.app_id), **kwargs)

    def _declare_topics(self) -> None:
        app_id = self.settings.app_id
        self.ticks_topic = self._topic(topics.ticks_topic(app_id), internal=True)
        self.credits_topic = self._topic(topics.credits_topic(app_id), internal=True)
        self.partials_topic = self._topic(topics.partials_topic(app_id), partitions=1,
                                          internal=True)

    def _declare_tables(self) -> None:
        settings, add = self.settings, self.app.tables.add
        self.rebalances = Rebalances()
        self.deals = add(FoldedTable(
            self.app, settings, name="deals", folds=self.deal_processor.folds,
            source_topic=self.ticks_topic.get_topic_name(),
            contributions=self.deal_processor.contributions_of_stored,
            on_ready=self._ready_callback("deals"), rebalances=self.rebalances,
            partitions=settings.partitions,
        ))
        self.customers = add(FoldedTable(
            self.app, settings, name="customers", folds=self.customer_processor.folds,
            source_topic=self.credits_topic.get_topic_name(),
            contributions=self.customer_processor.contributions_of_stored,
            on_ready=self._ready_callback("customers"), rebalances=self.rebalances,
            partitions=settings.partitions,
        ))
        self.erasures = add(ErasureTable(self.app, settings, self.deal_processor.erased,
                                         on_ready=self._ready_callback("erasures"),
                                         rebalances=self.rebalances, name="erasures",
                                         partitions=settings.partitions))
        self.publisher_state = add(RawTable(self.app, settings, name="publisher", partitions=1))
        self.app.on_partitions_revoked.connect(self._on_revoked)

    def _declare_agents(self) -> None:
        app = self.app
        app.agent(self.ticks_topic, name="deal-agent")(self.deal_agent)
        app.agent(self.credits_topic, name="customer-agent")(self.customer_agent)
        app.agent(self.partials_topic, name="kpi-publisher")(self.kpi_publisher)
        app.timer(interval=self.settings.tick_interval)(self.tick)
        app.task(self.events.run)
        app.task(self.follow_snapshots)
        if self.redis is not None:
            app.task(self.redis.run)

    def _declare_web(self) -> None:
        self.registry.register(WorkerKpiCollector(
            self.config,
            lambda: current_partitions(self.deal_processor.folds.folds,
                                       self.customer_processor.folds.folds),
            self.clock.now_ms, VERSION, self.settings.partitions,
        ))
        registry = self.registry

        @self.app.page("/metrics")
        async def metrics_view(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
            return web.bytes(generate_latest(registry), content_type=METRICS_CONTENT_TYPE)

        token = self.settings.api_token
        register_api(self.app, self.feed, pipelines=list(self.config.pipelines),
                     readiness=self.readiness, token=token.get_secret_value() if token else None)

    # -- readiness and rebalances ---------------------------------------------------------------

    def _ready_callback(self, name: str) -> Callable[[set[int], set[int]], None]:
        self.ready_parts[name] = False

        def on_ready(active: set[int], standby: set[int]) -> None:
            self.ready_parts[name] = True
            if name == "deals":
                self.active_partitions = active
                self.metrics.active_partitions.set(len(active))
                self.metrics.standby_partitions.set(len(standby))
            if self.is_ready():
                self.events.assign(self.active_partitions)
            self.metrics.ready.set(1 if self.is_ready() else 0)
        return on_ready

    def is_ready(self) -> bool:
        return bool(self.ready_parts) and all(self.ready_parts.values())

    def readiness(self) -> dict[str, str]:
        """For /readyz: ready with recovered tables and a broker that answered lately; Redis is
        an optional output, reported but never a reason to take the worker out of service."""
        silent = time.monotonic() - self.broker_answered_at
        broker_ok = silent <= max(3 * self.settings.tick_interval, BROKER_SILENCE_MIN_S)
        body = {"status": "ready" if self.is_ready() and broker_ok else
                "recovering" if broker_ok else "broker unreachable",
                "tables": "recovered" if self.is_ready() else "recovering",
                "broker": "ok" if broker_ok else f"no answer for {silent:.0f}s"}
        if self.redis is not None:
            body["redis"] = "ok" if self.redis.healthy else "unreachable"
        return body

    def _broker_answered(self) -> None:
        self.broker_answered_at = time.monotonic()

    async def _on_revoked(self, app: faust.App, revoked: set[TP], **_: Any) -> None:
        self._stop_serving()
        await self.events.revoke()
        self.metrics.rebalances.inc()
        self.metrics.publisher.set(0)
        self.publisher.revoked()

    def _stop_serving(self) -> None:
        """On a revoke, and when the group says this worker is no longer a member (a failed
        commit): a batch in flight is fenced off from here on, and nothing is exported."""
        self.rebalances.revoked()  # first: a recovery or a batch completing from here on is overtaken
        for name in self.ready_parts:
            self.ready_parts[name] = False
        self.metrics.ready.set(0)
        # Rebalances are eager (everything is revoked): from now on the next owner reports these
        # partitions, so stop exporting them at once (the recording rules show a gap until every
        # partition is exported again, exactly once).
        self.deal_processor.folds.revoke_all()
        self.customer_processor.folds.revoke_all()

    def _scan_partitions(self, partitions: frozenset[int]) -> Iterator[tuple[str, bytes]]:
        """Every stored deal of the given partitions (erasures, undoing a failed batch: a full
        scan)."""
        for key, value in list(self.deals.data.items()):
            if value is not None and orjson.loads(value)[2] in partitions:
                yield key.decode(), value

    # -- agents ---------------------------------------------------------------------------------

    def _sink_error(self, sink: str) -> None:
        self.metrics.sink_errors.labels(sink).inc()

    def _outbox(self) -> Outbox:
        return Outbox(self.app, self._sink_error, self._broker_answered)

    def _batches(self, stream: faust.StreamT):
        return stream.take_events(self.settings.batch_size, self.settings.batch_within)

    async def handle_events(self, records: list[Any]) -> None:
        """A batch of ``crm.events`` records from the events consumer (which re-reads it when
        this raises)."""
        async with self.deals_lock:
            await self._process_deals(records, frozenset(), "events")

    async def deal_agent(self, stream: faust.StreamT) -> None:
        """Ticks and erasure requests, one partition at a time, taking turns with the events
        batches (each holds the deals lock)."""
        async for events in self._batches(stream):
            by_partition: dict[int, list[Record]] = {}
            for record in _records(events):
                by_partition.setdefault(record.partition, []).append(record)
            for partition, records in by_partition.items():
                await self._ticks_until_done(partition, records)

    async def _ticks_until_done(self, partition: int, records: list[Record]) -> None:
        """Ticks and erasures are consumed by Faust's stream, which never reads them again: a
        failed batch is retried here until it goes through (stall alerts that did not go out
        are raised again) or the partition is no longer ours (its next owner checks it)."""
        while True:
            lagging = (frozenset([partition]) if await self.events.lag(partition) > MAX_CHECK_LAG
                       else frozenset())
            try:
                async with self.deals_lock:
                    await self._process_deals(records, lagging, "ticks")
                return
            except Revoked:
                await self._hand_over_erasures(records)
                return
            except Exception:
                log.exception("ticks of partition %d failed; retrying in %.0f s", partition,
                              RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)
            owned = self.deal_processor.folds.owned
            if owned is not None and partition not in owned:
                return

    async def _hand_over_erasures(self, records: list[Record]) -> None:
        """Erasure requests of a batch fenced off by a revoke: Faust has them as consumed, so
        they go back on the ticks topic for the partition's next owner (erasing is idempotent)."""
        for record in records:
            if is_erasure(record):
                await self.ticks_topic.send(value=record.value, partition=record.partition)

    async def _process_deals(self, records: list[Any], lagging: frozenset[int], agent: str) -> None:
        """One batch, all or nothing. Its stall alerts go out and are acknowledged before the
        deals that remember them are written: a failure or a kill in between raises them again
        (at least once; ids are deterministic, so consumers drop a repeat). The store takes the
        writes once the changelog has them; any failure before takes the batch's fold updates
        back, and a revoke meanwhile fences the batch off (:class:`Revoked`: nothing written)."""
        revocations = self.rebalances.revocations

        def still_ours() -> bool:
            return self.rebalances.revocations == revocations

        try:
            batch = self.deal_processor.process(records, _reader(self.deals), lagging)
            try:
                if batch.alerts:
                    for alert in batch.alerts:
                        self._send_alert(self.deals_out, alert)
                    await self.deals_out.flush(still_ours)
                self._queue_writes(batch)
                await self.deals_out.flush(still_ours)
            except BaseException:
                self.deal_processor.undo(batch)
                raise
        except Revoked:
            raise
        except Exception:
            self.metrics.failed_batches.labels(agent).inc()
            raise

    def _queue_writes(self, batch: DealBatch) -> None:
        out = self.deals_out
        for deal_id, value, record in batch.writes:
            out.put(self.deals, deal_id, value, record.partition)
        for pseudonym, record in batch.erased:
            out.put(self.erasures, pseudonym, b"1", record.partition)
        for rejection in batch.rejections:
            self._to_dlq(out, rejection)
        for credit in batch.credits:
            out.send(self.credits_topic.get_topic_name(), credit.account.encode(),
                     credit.encode(), sink="credits")

    async def customer_agent(self, stream: faust.StreamT) -> None:
        out = self._outbox()
        async for events in self._batches(stream):
            for account, value, record in self.customer_processor.process(
                _records(events), _reader(self.customers)
            ):
                out.put(self.customers, account, value, record.partition)
            await out.flush()

    async def kpi_publisher(self, stream: faust.StreamT) -> None:
        out = self._outbox()
        async for events in self._batches(stream):
            published = self.publisher.process(_records(events), _reader(self.publisher_state),
                                               self.app.consumer_generation_id)
            self.metrics.publisher.set(1)
            for key, value, record in published.writes:
                out.put(self.publisher_state, key, value, record.partition)
            for alert in published.alerts:
                self._send_alert(out, alert)
            for snapshot in published.snapshots:
                out.send(topics.KPIS, snapshot.pipeline.encode(),
                         snapshot.model_dump_json().encode(), sink="kpis")
            await out.flush()
            if self.redis is not None:
                for snapshot in published.snapshots:
                    self.redis.snapshot(snapshot)

    async def tick(self) -> None:
        """Ask the deal agent of each owned partition to check stalls (it may write the table),
        and publish each owned partition's partial for the KPI publisher."""
        now = self.clock.now_ms()
        sent = []
        for kind, folds in (("deals", self.deal_processor.folds),
                            ("customers", self.customer_processor.folds)):
            for partition, fold in list(folds.folds.items()):
                lag = 0
                if kind == "deals":
                    sent.append(await self.ticks_topic.send(value=b"tick", partition=partition))
                    lag = await self.events.lag(partition)
                sent.append(await self.partials_topic.send(
                    key=f"{kind}:{partition}".encode(), partition=0,
                    value=encode_partial(kind, partition, now, self.config, fold, lag,
                                         self.app.consumer_generation_id),
                ))
                # A partial costs about a scrape of its partition: let events batches in
                # between rather than hold the loop for all of them (latency).
                await asyncio.sleep(0)
        await self._probe_broker(sent)

    async def _probe_broker(self, sent: list[Any]) -> None:
        """The tick's own sends prove the broker answers; a worker without partitions asks for
        metadata instead, so funnel_broker_ack_age_seconds never goes stale on a healthy one."""
        try:
            if sent:
                await asyncio.gather(*sent)
            else:  # Faust's producer has no public handle on its client
                await self.app.producer._ensure_producer().client.fetch_all_metadata()
        except Exception as exc:  # the next tick tries again; the age gauge keeps growing
            log.warning("broker did not answer the tick: %r", exc)
            return
        self._broker_answered()

    def _fleet_clock(self, snapshot: KpiSnapshot) -> None:
        """The stream clock is one for the fleet: adopt the publisher's (the latest of every
        partition owner's clock)."""
        self.clock.observe(int(datetime.fromisoformat(snapshot.as_of).timestamp() * 1000))

    async def follow_snapshots(self) -> None:
        await self.feed.follow(self.settings.broker)

    # -- outputs --------------------------------------------------------------------------------

    def _to_dlq(self, out: Outbox, rejection: Rejection) -> None:
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
        self.metrics.dlq.inc()

    def _send_alert(self, out: Outbox, alert: Alert) -> None:
        if self.redis is not None:
            self.redis.alert(alert)
        out.send(topics.ALERTS, (alert.deal_id or alert.pipeline).encode(),
                 alert.model_dump_json(exclude_none=True).encode(), sink="alerts")
