"""What the batch loop does with one batch: the processors' results, written all or nothing.

Made durable in order: a KPI publisher's claim of a new generation (a generation never goes out
unless stored), the alerts, then every table write, DLQ copy, credit and snapshot, then the
position rows. A failure or a kill between them repeats the batch (alert ids are deterministic,
table writes absolute: a repeat changes nothing). A failure anywhere takes the deal folds back
(rebuilt from the store, which still holds the old versions); the customer folds move only
once their rows are written; the publisher keeps nothing the store may not hold.
"""

from __future__ import annotations

from collections.abc import Callable

import faust
import orjson

from models.alerts import Alert
from processors.customers import CustomerBatch, CustomerProcessor
from processors.deals import DealBatch, DealProcessor
from processors.erasure import erasure_pseudonym
from processors.records import Record, Rejection
from sinks.process_metrics import ProcessMetrics
from sinks.redis import RedisSink
from streams.kafka import topics
from streams.worker.loop import Batch, position_key
from streams.worker.outbox import Outbox, Revoked
from streams.worker.publisher import KpiPublisher, Published

# DLQ copies of oversized messages are cut to this (brokers refuse > 1 MB by default).
DLQ_MAX_VALUE = 64 * 1024


class BatchStep:
    def __init__(self, *, deals: DealProcessor, customers: CustomerProcessor, publisher: KpiPublisher,
                 outbox: Outbox, tables: dict[str, faust.Table], metrics: ProcessMetrics,
                 credits_topic: str, partials_topic: str, fleet: str, redis: RedisSink | None,
                 epoch: Callable[[], int | None]) -> None:
        self.deals = deals
        self.customers = customers
        self.publisher = publisher
        self.partials_topic = partials_topic
        self.fleet = [(topics.FLEET_HEADER, fleet.encode())]
        self.out = outbox
        self.tables = tables
        self.metrics = metrics
        self.credits_topic = credits_topic
        self.redis = redis
        self.epoch = epoch

    async def __call__(self, batch: Batch) -> None:
        def ours() -> bool:
            return self.epoch() == batch.epoch

        deals_table, customers_table = self.tables["deals"], self.tables["customers"]
        deals = None
        try:
            erasures = filter(None, map(erasure_pseudonym, batch.records[topics.ERASURES]))
            deals = self.deals.process(batch.records[topics.EVENTS], deals_table.read,
                                       batch.stall_checks, erasures)  # undone by itself if it fails
            customers = self.customers.process(batch.records[self.credits_topic], customers_table.read)
            published = self._publish(batch.records[self.partials_topic], batch.epoch)
            for key, value in published.claim:
                self.out.put(deals_table, publisher_key(key), value, 0)
            await self.out.flush(ours)
            for alert in deals.alerts + published.alerts:
                send_alert(self.out, self.redis, alert)
            await self.out.flush(ours)
            self._queue(deals, customers, published)
            for key, row, partition in customers.writes:
                self.out.put(customers_table, key, row, partition)
            await self.out.flush(ours, trailers={
                (deals_table, partition): (position_key(partition), orjson.dumps(positions))
                for partition, positions in batch.positions.items()})
        except BaseException as exc:
            self.out.discard()
            if deals is not None:
                self.deals.undo(deals)
            self.publisher.failed()
            if isinstance(exc, Exception) and not isinstance(exc, Revoked):
                self.metrics.failed_batches.labels("loop").inc()
            raise
        self.customers.commit(customers)
        count(self.metrics, deals, customers.rejections)
        if self.redis is not None:
            for snapshot in published.snapshots:
                self.redis.snapshot(snapshot)

    def _publish(self, partials: list[Record], epoch: int) -> Published:
        """The KPI publisher's step: the owner of partition 0 reads every partition's partials."""
        if not partials:
            return Published([], [], [], [])
        self.metrics.publisher.set(1)
        load = self.tables["deals"].read
        return self.publisher.process(partials, lambda key, record: load(publisher_key(key)), epoch)

    def _queue(self, batch: DealBatch, customers: CustomerBatch, published: Published) -> None:
        out = self.out
        for key, value in published.writes:
            out.put(self.tables["deals"], publisher_key(key), value, 0)
        for snapshot in published.snapshots:
            out.send(topics.KPIS, snapshot.pipeline.encode(), snapshot.model_dump_json().encode(),
                     sink="kpis", headers=self.fleet)
        for deal_id, value, partition in batch.writes:
            out.put(self.tables["deals"], deal_id, value, partition)
        for rejection in batch.rejections + customers.rejections:
            self._to_dlq(rejection)
        for credit in batch.credits:
            out.send(self.credits_topic, credit.account.encode(), credit.encode(), sink="credits")

    def _to_dlq(self, rejection: Rejection) -> None:
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
        self.out.send(topics.DLQ, record.key, value, headers=headers, sink="dlq")


def publisher_key(key: str) -> str:
    """Where the KPI publisher's state lives: beside the deals of partition 0, whose owner is
    the publisher (no deal id starts with NUL)."""
    return f"\x00publisher:{key}"


def count(metrics: ProcessMetrics, batch: DealBatch, bad_credits: list[Rejection]) -> None:
    """A batch's events and rejections: once per batch that went through, not per try (a bad
    credit is no event: counted as a dead letter only)."""
    metrics.counted(batch.outcomes, batch.lags)
    for rejection in batch.rejections:
        metrics.rejected(rejection.source, rejection.code)
    metrics.dlq.inc(len(batch.rejections) + len(bad_credits))


def send_alert(out: Outbox, redis: RedisSink | None, alert: Alert) -> None:
    if redis is not None:
        redis.alert(alert)
    out.send(topics.ALERTS, (alert.deal_id or alert.pipeline).encode(),
             alert.model_dump_json(exclude_none=True).encode(), sink="alerts")
