"""What the batch loop does with one batch: the processors' results, written all or nothing.

Alerts go out and are acknowledged first, then every table write, DLQ copy and credit, then the
position rows: a failure or a kill between them repeats the batch (at least once; alert ids are
deterministic, table writes absolute, so a repeat changes nothing). A failure before the
writes are acknowledged takes the deal folds back (rebuilt from the store, which still holds the
old versions); the customer folds move only once their rows are written.
"""

from __future__ import annotations

from collections.abc import Callable

import faust
import orjson

from models.alerts import Alert
from processors.customers import CustomerProcessor
from processors.deals import DealBatch, DealProcessor
from processors.erasure import erasure_pseudonym
from processors.records import Rejection
from sinks.prometheus import ProcessMetrics
from sinks.redis import RedisSink
from streams.kafka import topics
from streams.worker.loop import Batch, position_key
from streams.worker.outbox import Outbox, Revoked

# DLQ copies of oversized messages are cut to this (brokers refuse > 1 MB by default).
DLQ_MAX_VALUE = 64 * 1024


class BatchStep:
    def __init__(self, *, deals: DealProcessor, customers: CustomerProcessor, outbox: Outbox,
                 tables: dict[str, faust.Table], metrics: ProcessMetrics, credits_topic: str,
                 redis: RedisSink | None, epoch: Callable[[], int | None]) -> None:
        self.deals = deals
        self.customers = customers
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
        try:
            erasures = filter(None, map(erasure_pseudonym, batch.records[topics.ERASURES]))
            deals = self.deals.process(batch.records[topics.EVENTS], deals_table.read,
                                       batch.stall_checks, erasures)
            customers = self.customers.process(batch.records[self.credits_topic], customers_table.read)
            try:
                if deals.alerts:
                    for alert in deals.alerts:
                        send_alert(self.out, self.redis, alert)
                    await self.out.flush(ours)
                self._queue(deals)
                for key, row, partition in customers.writes:
                    self.out.put(customers_table, key, row, partition)
                await self.out.flush(ours, trailers={
                    (deals_table, partition): (position_key(partition), orjson.dumps(positions))
                    for partition, positions in batch.positions.items()
                })
            except BaseException:
                self.deals.undo(deals)
                raise
        except Revoked:
            raise
        except Exception:
            self.metrics.failed_batches.labels("loop").inc()
            raise
        self.customers.commit(customers)
        count(self.metrics, deals)

    def _queue(self, batch: DealBatch) -> None:
        out = self.out
        for deal_id, value, partition in batch.writes:
            out.put(self.tables["deals"], deal_id, value, partition)
        for rejection in batch.rejections:
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


def count(metrics: ProcessMetrics, batch: DealBatch) -> None:
    """A batch's events and rejections: once per batch that went through, not per try."""
    metrics.counted(batch.outcomes, batch.lags)
    for rejection in batch.rejections:
        metrics.rejected(rejection.source, rejection.code)
        metrics.dlq.inc()


def send_alert(out: Outbox, redis: RedisSink | None, alert: Alert) -> None:
    if redis is not None:
        redis.alert(alert)
    out.send(topics.ALERTS, (alert.deal_id or alert.pipeline).encode(),
             alert.model_dump_json(exclude_none=True).encode(), sink="alerts")
