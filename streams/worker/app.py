"""The Faust worker: wiring of the batch loop, the tables, the partials and the web views.

Flow (docs/design.md §6): ``crm.events`` and customer credits of the partitions Faust
assigned, and ``funnel.erasures`` → the batch loop (:mod:`streams.worker.loop`) → the processors
(:mod:`processors`) → one outbox: ``deals``/``customers`` changelogs, alerts, DLQ, credits
re-keyed by account → per-partition folds → ``/metrics``. Every tick each worker sends a partial
per owned partition to a one-partition topic; the owner of partition 0 reads them in its batch
loop and publishes (:mod:`streams.worker.publisher`): ``funnel.kpis``, conversion-drop alerts,
Redis. Faust keeps group membership and assignment (its agent on the empty assignment topic
anchors the co-partitioned assignment), changelog recovery, standbys, timers and the web server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import faust
import orjson
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.process_collector import ProcessCollector

from models.config import load_config
from models.snapshot import KpiSnapshot
from processors.clock import EventClock
from processors.customers import CustomerProcessor
from processors.deals import DealProcessor
from sinks.prometheus import REJECTION_REASONS, SINKS, ProcessMetrics, WorkerKpiCollector, current_partitions
from sinks.redis import RedisSink
from streams.http.api import SnapshotFeed, register_api
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.worker.faust_app import faust_app
from streams.worker.loop import BatchLoop, is_position_key, position_key
from streams.worker.outbox import BatchProducer, Outbox
from streams.worker.publisher import KpiPublisher, encode_partial
from streams.worker.step import BatchStep
from streams.worker.tables import FoldedTable

log = logging.getLogger("funnel_kpi")
# Prometheus text format 0.0.4; aiohttp adds the charset itself.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
# /readyz says "broker unreachable" after max(3 ticks, this) seconds without a broker answer.
BROKER_SILENCE_MIN_S = 30.0

try:
    VERSION = version("funnel-kpi")
except PackageNotFoundError:  # running from a source tree
    VERSION = "0.0.0+source"


class FunnelWorker:
    """One worker process: build it, then run ``self.app`` with a Faust worker."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings = settings or Settings()
        self.config = config = load_config(settings.config)
        self.clock = EventClock(settings.clock or config.clock)
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.metrics = ProcessMetrics(self.registry)
        self.metrics.seed(sorted(config.sources | {"other", "unknown"}), REJECTION_REASONS, SINKS)
        self.consumer_lag = Gauge(
            "funnel_consumer_lag_messages", "Messages behind the end of the partition",
            ["topic", "partition"], registry=self.registry,
        )
        self.deal_processor = DealProcessor(
            config, self.clock, max_skew_ms=int(settings.max_future_skew * 1000),
            min_occurred_ms=int(settings.min_occurred_at.timestamp() * 1000),
            partitions=settings.partitions, scan=self._scan_partitions,
            max_stalls_per_check=settings.stall_alerts_per_tick,
        )
        self.customer_processor = CustomerProcessor()
        self.publisher = KpiPublisher(config, settings.partitions, VERSION)
        self.feed = SnapshotFeed(on_accepted=self._fleet_clock)
        self.redis = (RedisSink(settings.redis_url.get_secret_value(),
                                self.metrics.sink_errors.labels("redis").inc)
                      if settings.redis_url else None)
        self.app = faust_app(settings)
        self.producer = BatchProducer(settings.broker)
        self.ready_generation: dict[str, int | None] = dict.fromkeys(topics.TABLES)
        self.broker_answered_at = time.monotonic()
        self.metrics.broker_ack_age.set_function(lambda: time.monotonic() - self.broker_answered_at)
        self.metrics.clock.set_function(lambda: self.clock.now_ms() / 1000)
        self._declare_topics()
        self._declare_tables()
        self.outbox = self._outbox()
        self.loop = BatchLoop(
            settings, [topics.EVENTS, self.credits_topic.get_topic_name()], topics.ERASURES,
            self.partials_topic.get_topic_name(),
            self.consumer_lag, self._step(), lambda p: self.deals.read(position_key(p)),
            lambda: self.outbox.producing,
        )
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
        self.assignment_topic = self._topic(topics.assignment_topic(app_id), internal=True)
        self.credits_topic = self._topic(topics.credits_topic(app_id), internal=True)
        self.partials_topic = self._topic(topics.partials_topic(app_id), partitions=1,
                                          internal=True)

    def _declare_tables(self) -> None:
        settings, add = self.settings, self.app.tables.add
        self.deals = add(FoldedTable(
            self.app, settings, name="deals", folds=self.deal_processor.folds,
            contributions=self.deal_processor.contributions_of_stored, active=self._active,
            on_ready=self._table_ready, partitions=settings.partitions,
        ))
        self.customers = add(FoldedTable(
            self.app, settings, name="customers", folds=self.customer_processor.folds,
            contributions=self.customer_processor.contributions_of_stored, active=self._active,
            on_ready=self._table_ready, partitions=settings.partitions,
        ))
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_before_shutdown.connect(self._stop_producer)

    def _declare_agents(self) -> None:
        app = self.app
        # Faust assigns the tables' partitions by the topics its agents read: this one, on a
        # topic nothing is written to, anchors the co-partitioned assignment.
        app.agent(self.assignment_topic, name="assignment-anchor")(self._anchor)
        app.timer(interval=self.settings.tick_interval)(self.tick)
        app.task(self.loop.run)
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

    def _step(self) -> BatchStep:
        return BatchStep(
            deals=self.deal_processor, customers=self.customer_processor, publisher=self.publisher,
            outbox=self.outbox, tables={"deals": self.deals, "customers": self.customers},
            metrics=self.metrics, credits_topic=self.credits_topic.get_topic_name(),
            partials_topic=self.partials_topic.get_topic_name(), fleet=self.settings.app_id,
            redis=self.redis, epoch=lambda: self.loop.epoch,
        )

    # -- readiness and rebalances ---------------------------------------------------------------

    def _active(self) -> set[int]:
        return {tp.partition for tp in self.app.assignor.assigned_actives()
                if tp.topic == self.assignment_topic.get_topic_name()}

    def _table_ready(self, name: str, generation: int) -> None:
        """A table recovered for group generation ``generation``: once all are, the batch loop
        reads the active partitions in that one epoch."""
        self.ready_generation[name] = generation
        if self.is_ready():
            active = self._active()
            standby = {tp.partition for tp in self.app.assignor.assigned_standbys()
                       if tp.topic == self.deals.changelog_topic.get_topic_name()}
            self.metrics.active_partitions.set(len(active))
            self.metrics.standby_partitions.set(len(standby))
            self.loop.assign(active, generation)
            log.info("serving partitions %s in generation %d (standby %s, not exported)",
                     sorted(active), generation, sorted(standby))
        self.metrics.ready.set(1 if self.is_ready() else 0)

    def is_ready(self) -> bool:
        generations = set(self.ready_generation.values())
        return len(generations) == 1 and None not in generations

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

    async def _on_revoked(self, app: faust.App, revoked: set[Any], **_: Any) -> None:
        """Rebalances are eager (everything is revoked): stop exporting at once (the next owner
        reports these partitions; the recording rules show a gap until every partition is
        exported again, exactly once), fence the batch in flight and wait for it."""
        for table in (self.deals, self.customers):
            table.generation = None  # a recovery completing from here on is overtaken
        self.ready_generation = dict.fromkeys(topics.TABLES)
        self.metrics.ready.set(0)
        self.deal_processor.folds.revoke_all()
        self.customer_processor.folds.revoke_all()
        await self.loop.revoke()
        self.metrics.rebalances.inc()
        self.metrics.publisher.set(0)
        self.publisher.revoked()

    async def _stop_producer(self, app: faust.App, **_: Any) -> None:
        await self.producer.stop()

    def _scan_partitions(self, partitions: frozenset[int] | None) -> Iterator[tuple[str, bytes]]:
        """Every stored deal of the given partitions, of all with None (erasures, undoing a
        failed batch: a full scan)."""
        for key, value in list(self.deals.data.items()):
            if value is None or is_position_key(key):
                continue
            if partitions is None or orjson.loads(value)[2] in partitions:
                yield key.decode(), value

    # -- agents and timers ----------------------------------------------------------------------

    async def _anchor(self, stream: faust.StreamT) -> None:
        async for _ in stream:
            pass

    def _sink_error(self, sink: str) -> None:
        self.metrics.sink_errors.labels(sink).inc()

    def _outbox(self) -> Outbox:
        return Outbox(self.producer, self._sink_error, self._broker_answered)

    def _broker_answered(self) -> None:
        self.broker_answered_at = time.monotonic()

    async def tick(self) -> None:
        """Publish each owned partition's partial for the KPI publisher."""
        now = self.clock.now_ms()
        sent = []
        for kind, folds in (("deals", self.deal_processor.folds),
                            ("customers", self.customer_processor.folds)):
            for partition, fold in list(folds.folds.items()):
                lag = self.loop.lag(partition) if kind == "deals" else 0
                sent.append(await self.partials_topic.send(
                    key=f"{kind}:{partition}".encode(), partition=0,
                    value=encode_partial(kind, partition, now, self.config, fold, lag,
                                         self.app.consumer_generation_id),
                ))
                # A partial costs about a scrape of its partition: let batches in between
                # rather than hold the loop for all of them (latency).
                await asyncio.sleep(0)
        await self._probe_broker(sent)

    async def _probe_broker(self, sent: list[Any]) -> None:
        """The tick's own sends prove the broker answers; a worker without partitions asks for
        metadata instead, so funnel_broker_ack_age_seconds never goes stale on a healthy one."""
        try:
            if sent:
                await asyncio.gather(*sent)
            else:
                await self.producer.probe()
        except Exception as exc:  # the next tick tries again; the age gauge keeps growing
            log.warning("broker did not answer the tick: %r", exc)
            return
        self._broker_answered()

    def _fleet_clock(self, snapshot: KpiSnapshot, fleet: str | None) -> None:
        """The stream clock is one for the fleet: adopt its publisher's (the latest of every
        partition owner's clock), never another fleet's (a rebuild under a new app id, or the
        old fleet beside it: their clocks stand elsewhere)."""
        if fleet == self.settings.app_id:
            self.clock.observe(int(datetime.fromisoformat(snapshot.as_of).timestamp() * 1000))

    async def follow_snapshots(self) -> None:
        await self.feed.follow(self.settings.broker)
