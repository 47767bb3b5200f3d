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
from collections.abc import Callable
from datetime import datetime
from typing import Any

import faust
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from models.config import FunnelConfig, load_config
from models.dimensions import budget_statement
from models.fleet_values import KeptValues
from models.rates import RateBook, reporting_book
from models.snapshot import KpiSnapshot
from processors.clock import EventClock
from processors.customers import CustomerProcessor
from processors.deals import DealProcessor
from sinks.process_metrics import REJECTION_REASONS, SINKS, ProcessMetrics
from sinks.prometheus import WorkerKpiCollector, current_partitions
from sinks.redis import RedisSink
from streams.http.api import SnapshotFeed, register_api
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.version import VERSION
from streams.worker.faust_app import faust_app
from streams.worker.loop import BatchLoop, position_key
from streams.worker.outbox import BatchProducer, Outbox
from streams.worker.publisher import KpiPublisher, owned_partials
from streams.worker.rates_feed import follow_rates
from streams.worker.readiness import Readiness
from streams.worker.step import BatchStep
from streams.worker.tables import FoldedTable, stored_deals

log = logging.getLogger("funnel_kpi")
# Prometheus text format 0.0.4; aiohttp adds the charset itself.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"



# The funnel config and its rates book (load_funnel): given to FunnelWorker when already loaded.
Funnel = tuple[FunnelConfig, RateBook | None]


class FunnelWorker:
    """One worker process: build it, then run ``self.app`` with a Faust worker."""

    def __init__(self, settings: Settings | None = None, funnel: Funnel | None = None) -> None:
        self.settings = settings = settings or Settings()
        config, self.rates = funnel or load_funnel(settings)
        self.config = config
        self.clock = EventClock(settings.clock or config.clock)
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.metrics = ProcessMetrics(self.registry)
        self.metrics.seed(sorted(config.sources | {"other", "unknown"}), REJECTION_REASONS, SINKS)
        self.deal_processor = DealProcessor(
            config, self.clock, max_skew_ms=int(settings.max_future_skew * 1000),
            min_occurred_ms=int(settings.min_occurred_at.timestamp() * 1000),
            partitions=settings.partitions, scan=lambda partitions: stored_deals(self.deals, partitions),
            max_stalls_per_check=settings.stall_alerts_per_tick,
        )
        self.customer_processor = CustomerProcessor()
        self.publisher = KpiPublisher(config, settings.partitions, VERSION)
        self.kept_values = KeptValues()
        self.feed = SnapshotFeed(on_accepted=own_fleet(self.clock, self.kept_values, settings.app_id))
        self.redis = (RedisSink(settings.redis_url.get_secret_value(),
                                self.metrics.sink_errors.labels("redis").inc)
                      if settings.redis_url else None)
        self.app = faust_app(settings)
        self.producer = BatchProducer(settings.broker)
        self.readiness = Readiness(self.metrics, settings.tick_interval,
                                   (lambda: self.redis.healthy) if self.redis else None)
        self.metrics.clock.set_function(lambda: self.clock.now_ms() / 1000)
        self._declare_topics()
        self._declare_tables()
        self.outbox = Outbox(self.producer, lambda sink: self.metrics.sink_errors.labels(sink).inc(),
                             self.readiness.broker_answered)
        credits, partials = self.credits_topic.get_topic_name(), self.partials_topic.get_topic_name()
        self.loop = BatchLoop(
            settings, [topics.EVENTS, credits], topics.ERASURES, partials, self.metrics.consumer_lag,
            BatchStep(deals=self.deal_processor, customers=self.customer_processor,
                      publisher=self.publisher, outbox=self.outbox,
                      tables={"deals": self.deals, "customers": self.customers}, metrics=self.metrics,
                      credits_topic=credits, partials_topic=partials, fleet=settings.app_id,
                      redis=self.redis, epoch=lambda: self.loop.epoch),
            lambda p: self.deals.read(position_key(p)), lambda: self.outbox.producing,
        )
        self._declare_agents()
        self._declare_web()

    # -- declarations -----------------------------------------------------------------------

    def _declare_topics(self) -> None:
        def topic(name: str, partitions: int | None = None) -> faust.TopicT:
            return self.app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                                  value_serializer="raw", internal=True,
                                  partitions=partitions or self.settings.partitions,
                                  config=topics.topic_configs(name, self.settings.app_id))
        self.assignment_topic, self.credits_topic = (
            topic(name(self.settings.app_id)) for name in (topics.assignment_topic, topics.credits_topic))
        self.partials_topic = topic(topics.partials_topic(self.settings.app_id), 1)

    def _declare_tables(self) -> None:
        self.deals, self.customers = (self.app.tables.add(FoldedTable(
            self.app, self.settings, name=name, folds=processor.folds,
            contributions=processor.contributions_of_stored, active=self._active,
            on_ready=self._table_ready, partitions=self.settings.partitions,
        )) for name, processor in (("deals", self.deal_processor), ("customers", self.customer_processor)))
        self.app.on_partitions_revoked.connect(self._on_revoked)
        self.app.on_before_shutdown.connect(self._stop_producer)

    def _declare_agents(self) -> None:
        app = self.app
        # Faust assigns the tables' partitions by the topics its agents read: this one, on a
        # topic nothing is written to, anchors the co-partitioned assignment.
        app.agent(self.assignment_topic, name="assignment-anchor")(_anchor)
        app.timer(interval=self.settings.tick_interval)(self.tick)
        app.task(self.loop.run)
        app.task(self.follow_topics)
        if self.redis is not None:
            app.task(self.redis.run)

    def _declare_web(self) -> None:
        self.registry.register(WorkerKpiCollector(
            self.config,
            lambda: current_partitions(self.deal_processor.folds.folds,
                                       self.customer_processor.folds.folds),
            self.clock.now_ms, VERSION, self.settings.partitions, self.rates, self.kept_values,
        ))
        @self.app.page("/metrics")
        async def metrics_view(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
            return web.bytes(generate_latest(self.registry), content_type=METRICS_CONTENT_TYPE)

        token = self.settings.api_token
        register_api(self.app, self.feed, pipelines=list(self.config.pipelines),
                     readiness=self.readiness.report, token=token.get_secret_value() if token else None)

    # -- readiness and rebalances ---------------------------------------------------------------

    def _active(self) -> set[int]:
        return {tp.partition for tp in self.app.assignor.assigned_actives()
                if tp.topic == self.assignment_topic.get_topic_name()}

    def _table_ready(self, name: str, generation: int) -> None:
        """A table recovered for group generation ``generation``: once all are, the batch loop
        reads the active partitions in that one epoch."""
        if self.readiness.table_ready(name, generation):
            active = self._active()
            standby = {tp.partition for tp in self.app.assignor.assigned_standbys()
                       if tp.topic == self.deals.changelog_topic.get_topic_name()}
            self.metrics.active_partitions.set(len(active))
            self.metrics.standby_partitions.set(len(standby))
            self.loop.assign(active, generation)
            log.info("serving partitions %s in generation %d (standby %s, not exported)",
                     sorted(active), generation, sorted(standby))

    async def _on_revoked(self, app: faust.App, revoked: set[Any], **_: Any) -> None:
        """Rebalances are eager (everything is revoked): stop exporting at once (the next owner
        reports these partitions; the recording rules show a gap until every partition is
        exported again, exactly once), fence the batch in flight and wait for it."""
        for table in (self.deals, self.customers):
            table.generation = None  # a recovery completing from here on is overtaken
        self.readiness.revoked()
        self.deal_processor.folds.revoke_all()
        self.customer_processor.folds.revoke_all()
        await self.loop.revoke()
        self.metrics.rebalances.inc()
        self.metrics.publisher.set(0)
        self.publisher.revoked()

    async def _stop_producer(self, app: faust.App, **_: Any) -> None:
        await self.producer.stop()

    # -- timers ----------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Publish each owned partition's partial for the KPI publisher."""
        sent = []
        for key, value in owned_partials(
                self.config, self.clock.now_ms(), self.app.consumer_generation_id, self.loop.lag,
                self.kept_values, deals=self.deal_processor.folds.folds,
                customers=self.customer_processor.folds.folds):
            sent.append(await self.partials_topic.send(key=key, partition=0, value=value))
            # A partial costs a scrape of its partition: let batches in between (latency).
            await asyncio.sleep(0)
        await self.readiness.probe(sent, self.producer.probe)

    async def follow_topics(self) -> None:
        """The topics followed outside the batch loop: snapshots (API, stream clock), rates."""
        followers = [self.feed.follow(self.settings.broker)]
        if self.rates is not None and self.config.rates.topic:
            followers.append(follow_rates(self.settings.broker, self.config.rates.topic, self.rates))
        await asyncio.gather(*followers)


def load_funnel(settings: Settings) -> Funnel:
    """The funnel config and its dated rates to the reporting currency (a bad config or rates
    file stops the start, one line); how the dimensions share the series budget is logged."""
    config = load_config(settings.config)
    if config.dimensions:
        log.info("%s", budget_statement(config))
    return config, reporting_book(config, settings.config)


def own_fleet(clock: EventClock, kept: KeptValues,
              fleet: str) -> Callable[[KpiSnapshot, str | None], None]:
    """The stream clock and the dimensions' kept values are one for the fleet: adopt its
    publisher's (the clock: the latest of every partition owner's), never another fleet's (a
    rebuild under a new app id, or the old fleet beside it: theirs stand elsewhere)."""
    def adopt(snapshot: KpiSnapshot, sender: str | None) -> None:
        if sender == fleet:
            clock.observe(int(datetime.fromisoformat(snapshot.as_of).timestamp() * 1000))
            kept.adopt(snapshot)
    return adopt


async def _anchor(stream: faust.StreamT) -> None:
    async for _ in stream:
        pass
