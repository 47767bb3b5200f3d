"""``funnel-kpi adapt``: raw CRM topics → canonical events on ``crm.events`` (the normalizer).

Reads ``crm.raw.hubspot`` / ``crm.raw.pipedrive`` (written by :mod:`streams.http.ingest`) and the CDC
topics (Salesforce, Debezium), runs each record through its source's adapter and produces the
canonical events keyed by ``deal_id``. At least once: offsets are committed only after every
event and DLQ message of a batch is acknowledged, and duplicates from a replay are harmless
because events keep their source's ids (the deal agent dedups). A record the adapter cannot
read goes to ``crm.events.dlq`` with its original bytes and headers plus the reason, like the
worker's DLQ; the bridge never stops on bad input. Gap notices are counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from models.event import encode_event
from streams.crm.sources import debezium, hubspot, pipedrive, salesforce
from streams.crm.sources.common import Adapted, Context, Malformed
from streams.crm.sources.settings import SourceSettings, context
from streams.http.ingest import METRICS_CONTENT_TYPE, ensure_raw_topics
from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.tools.producer import ensure_event_topics

log = logging.getLogger("funnel_kpi.adapt")
SOURCES = ("hubspot", "pipedrive", "salesforce", "debezium")
Adapter = Callable[[Any, Context, Any], Adapted]
ADAPTERS: dict[str, Adapter] = {
    "hubspot": lambda value, ctx, key: hubspot.adapt(value, ctx),
    "pipedrive": lambda value, ctx, key: pipedrive.adapt(value, ctx),
    "salesforce": lambda value, ctx, key: salesforce.adapt(value, ctx),
    "debezium": debezium.adapt,
}
RETRY_SECONDS = (0.5, 1, 2, 5, 10)


def convert(source: str, value: bytes | None, key: bytes | None, ctx: Context) -> Adapted:
    """Run a source's adapter on one raw record; never raises for bad input."""
    if value is None and source != "debezium":
        return Adapted(rejects=[Malformed("empty", "message has no value")])
    try:
        return ADAPTERS[source](value, ctx, key)
    except Malformed as exc:
        return Adapted(rejects=[exc])
    except RecursionError:
        return Adapted(rejects=[Malformed("too_deep", "payload nested too deeply")])


def dlq_headers(record: ConsumerRecord, rejects: list[Malformed]) -> list[tuple[str, bytes]]:
    """The original headers, then the reason and where the record came from (as the worker)."""
    reason = rejects[0].reason
    if len(rejects) > 1:
        reason += f" (and {len(rejects) - 1} more records of this message)"
    return [
        *(record.headers or ()),
        ("funnel.reason", reason.encode()),
        ("funnel.reason.code", rejects[0].code.encode()),
        ("funnel.source.topic", record.topic.encode()),
        ("funnel.source.partition", str(record.partition).encode()),
        ("funnel.source.offset", str(record.offset).encode()),
    ]


class AdaptMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter(
            "funnel_adapt_messages",
            "Raw CRM messages read, by source and outcome (ok, dlq)",
            ["source", "outcome"],
            registry=registry,
        )
        self.events = Counter(
            "funnel_adapt_events", "Canonical events produced to crm.events", ["source"], registry=registry
        )
        self.skipped = Counter(
            "funnel_adapt_skipped",
            "Source records with nothing for the funnel",
            ["source", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "funnel_adapt_rejected",
            "Malformed source records (their message goes to the DLQ)",
            ["source", "code"],
            registry=registry,
        )
        self.gaps = Counter(
            "funnel_adapt_gaps",
            "CDC gap notices: changes not described, refetch or resync",
            ["source", "entity", "change_type"],
            registry=registry,
        )
        self.retries = Counter(
            "funnel_adapt_retries", "Batches retried after a broker error", registry=registry
        )
        self.lag = Gauge(
            "funnel_adapt_consumer_lag_messages",
            "Raw messages not adapted yet, per assigned raw-topic partition",
            ["topic", "partition"],
            registry=registry,
        )
        for source in SOURCES:
            self.events.labels(source)
            for outcome in ("ok", "dlq"):
                self.messages.labels(source, outcome)

    def count(self, source: str, result: Adapted) -> None:
        """One raw message adapted: its events, skips, rejects and gaps (gaps also logged)."""
        self.messages.labels(source, "dlq" if result.rejects else "ok").inc()
        if result.events:
            self.events.labels(source).inc(len(result.events))
        for reason in result.skipped:
            self.skipped.labels(source, reason).inc()
        for reject in result.rejects:
            self.rejected.labels(source, reject.code).inc()
        for gap in result.gaps:
            self.gaps.labels(source, gap.entity, gap.change_type).inc()
            log.warning(
                "%s gap: %s %s for %s; refetch these records (or resync the entity if no ids are given)",
                source,
                gap.entity,
                gap.change_type,
                ", ".join(gap.record_ids[:20]) or "unknown records",
            )


class Bridge:
    """Consume raw topics, adapt, produce, commit; also serves /metrics and /healthz."""

    def __init__(
        self,
        settings: Settings,
        sources: SourceSettings,
        ctx: Context,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.sources = sources
        self.ctx = ctx
        self.topic_sources = sources.raw_topics
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.metrics = AdaptMetrics(self.registry)
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None
        self.runner: web.AppRunner | None = None
        self.last_poll = time.monotonic()
        self.lagging: set[tuple[str, str]] = set()  # (topic, partition) children of the lag gauge

    async def start(self) -> Bridge:
        await ensure_event_topics(self.settings)
        await ensure_raw_topics(self.settings, list(self.topic_sources))
        connect = kafka_client.client_args(self.settings.broker)
        self.producer = AIOKafkaProducer(
            **connect, acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024
        )
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            *self.topic_sources,
            **connect,
            group_id=f"{self.settings.app_id}-adapt",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(self.settings.session_timeout * 1000),
        )
        await self.consumer.start()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.settings.web_bind, self.sources.adapt_port).start()
        log.info(
            "adapting %s → %s (metrics on port %s)",
            ", ".join(self.topic_sources),
            topics.EVENTS,
            self.sources.adapt_port,
        )
        return self

    async def stop(self) -> None:
        for closing in (self.consumer, self.producer):
            if closing is not None:
                await closing.stop()
        if self.runner is not None:
            await self.runner.cleanup()

    async def run(self, stop: asyncio.Event) -> None:
        assert self.consumer is not None
        failures = 0
        while not stop.is_set():
            await self._measure_lag()
            batch = await self.consumer.getmany(timeout_ms=500, max_records=self.sources.adapt_batch)
            self.last_poll = time.monotonic()
            if not batch:
                continue
            try:
                await self.handle(batch)
                failures = 0
            except KafkaError as exc:
                # Nothing of this batch is committed: rewind and try again, never skip.
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                failures += 1
                self.metrics.retries.inc()
                log.warning("broker error (%s); retrying the batch in %ss", exc, delay)
                for tp, records in batch.items():
                    self.consumer.seek(tp, records[0].offset)
                await asyncio.sleep(delay)

    async def handle(self, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Adapt and produce one batch, wait for every acknowledgement, then commit."""
        assert self.consumer is not None and self.producer is not None
        pending = []
        for records in batch.values():
            for record in records:
                source = self.topic_sources[record.topic]
                result = convert(source, record.value, record.key, self.ctx)
                for event in result.events:
                    pending.append(
                        await self.producer.send(
                            topics.EVENTS, encode_event(event), key=event["deal_id"].encode()
                        )
                    )
                if result.rejects:
                    pending.append(
                        await self.producer.send(
                            topics.DLQ,
                            record.value or b"",
                            key=record.key,
                            headers=dlq_headers(record, result.rejects),
                        )
                    )
                    log.info("%s record %s:%s:%s to the DLQ: %s", source, record.topic,
                             record.partition, record.offset, result.rejects[0].reason)
                self.metrics.count(source, result)
        await asyncio.gather(*pending)
        await self.consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})

    async def _measure_lag(self) -> None:
        """Raw-topic lag before the next fetch: what the CRMs sent that is not adapted yet."""
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        gauge = self.metrics.lag
        for topic, partition in list(self.lagging):
            if TopicPartition(topic, int(partition)) not in assigned:
                gauge.remove(topic, partition)
                self.lagging.discard((topic, partition))
        for tp in assigned:
            highwater = self.consumer.highwater(tp)
            if highwater is None:  # not fetched yet
                continue
            try:
                position = await self.consumer.position(tp)
            except IllegalStateError:  # unassigned meanwhile (a rebalance)
                continue
            gauge.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))
            self.lagging.add((tp.topic, str(tp.partition)))

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        stalled = time.monotonic() - self.last_poll > 60
        return web.json_response({"status": "stalled" if stalled else "ok"}, status=503 if stalled else 200)


async def run_adapt(settings: Settings, sources: SourceSettings, stop: asyncio.Event) -> None:
    bridge = await Bridge(settings, sources, context(settings, sources)).start()
    try:
        await bridge.run(stop)
    finally:
        await bridge.stop()
