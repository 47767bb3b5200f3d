"""Everything one batch writes — table changelog records and output messages — produced
together, in one aiokafka batch per topic partition (an awaited ``send`` per record cost more
CPU than the record's domain work), and acknowledged before the stores take the table writes.

Changelog records keep Faust's format (raw key/value on ``<app>-<table>-changelog``, the
partition of their source record), so recovery and standbys work as usual; acknowledged writes
reach the store as recovery applies a changelog (``Store.apply_changelog_batch``, which also
moves RocksDB's persisted offsets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from faust.types import TP

from processors.records import kafka_partition
from streams.kafka import client as kafka_client

log = logging.getLogger("funnel_kpi.outbox")
Headers = list[tuple[str, bytes]]
# The last record of each changelog partition a flush writes (unless the caller gives one).
END_MARKER = b"\x00funnel-kpi:end-of-batch"


class Revoked(Exception):
    """A batch fenced off: its partitions were revoked before it wrote anything."""


class _Written:
    """An acknowledged changelog record, in the shape ``apply_changelog_batch`` reads."""

    __slots__ = ("key", "offset", "partition", "tp", "value")

    def __init__(self, key: bytes, value: bytes | None, tp: TP, offset: int) -> None:
        self.key, self.value, self.tp, self.offset = key, value, tp, offset
        self.partition = tp.partition

    @property
    def message(self) -> _Written:
        return self


def _identity(value: Any) -> Any:
    return value


class BatchProducer:
    """One producer for the worker's outboxes, started on first use; records go out in one
    batch per topic partition (a keyed record without a partition gets Kafka's default
    partitioner's: murmur2 of the key)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()
        self._counts: dict[str, int] = {}

    async def _started(self) -> AIOKafkaProducer:
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(**kafka_client.client_args(self.broker_url), acks="all",
                                            linger_ms=5, max_batch_size=1 << 20)
                await producer.start()
                self._producer = producer
        return self._producer

    async def probe(self) -> None:
        """Ask the cluster for its metadata: proof that a broker answers."""
        await (await self._started()).client.fetch_all_metadata()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def _partition(self, producer: AIOKafkaProducer, topic: str, key: bytes | None,
                         index: int) -> int:
        count = self._counts.get(topic)
        if count is None:
            count = self._counts[topic] = len(await producer.partitions_for(topic))
        return kafka_partition(key, count) if key is not None else index % count

    async def produce(self, records: list[tuple[str, bytes | None, bytes | None, int | None,
                                                 Headers | None]]) -> list[Any]:
        """Each record's ``(topic, partition, offset)``, or the exception that failed its batch."""
        producer = await self._started()
        open_batches: dict[tuple[str, int], tuple[Any, list[tuple[int, int]]]] = {}
        sent: list[tuple[asyncio.Future, str, int, list[tuple[int, int]]]] = []
        for index, (topic, key, value, partition, headers) in enumerate(records):
            if partition is None:
                partition = await self._partition(producer, topic, key, index)
            while True:
                batch, members = open_batches.get((topic, partition)) or (producer.create_batch(), [])
                open_batches[(topic, partition)] = (batch, members)
                appended = batch.append(key=key, value=value, timestamp=None, headers=headers or [])
                if appended is not None:
                    members.append((index, appended.offset))
                    break
                if not members:
                    raise KafkaError(f"a record of {len(value or b'')} bytes does not fit a batch")
                del open_batches[(topic, partition)]  # full: send it, start another
                sent.append((await producer.send_batch(batch, topic, partition=partition), topic,
                             partition, members))
        for (topic, partition), (batch, members) in open_batches.items():
            sent.append((await producer.send_batch(batch, topic, partition=partition), topic,
                         partition, members))
        results: list[Any] = [None] * len(records)
        acks = await asyncio.gather(*(future for future, *_ in sent), return_exceptions=True)
        for (_, topic, partition, members), ack in zip(sent, acks, strict=True):
            for index, relative in members:
                results[index] = ack if isinstance(ack, BaseException) else (
                    topic, partition, ack.offset + relative)
        return results


class Outbox:
    def __init__(self, producer: BatchProducer, on_error: Callable[[str], None],
                 on_acked: Callable[[], None]) -> None:
        self.producer = producer
        self.on_error = on_error
        self.on_acked = on_acked
        self.pending: list[tuple[str, bytes | None, bytes | None, int | None, Headers | None, str,
                                 faust.Table | None]] = []
        self.producing = False  # between the fence and the last acknowledgement of a flush

    def put(self, table: faust.Table, key: str, value: bytes | None, partition: int) -> None:
        """Queue a table write (``None`` deletes the key: a tombstone in the changelog). The
        store takes it once the changelog has it: a batch that fails or is fenced by a revoke
        leaves the store as it was, like the folds."""
        self.pending.append((table.changelog_topic.get_topic_name(), key.encode(), value, partition,
                             None, "changelog", table))

    def send(self, topic: str, key: bytes | None, value: bytes, *, sink: str,
             partition: int | None = None, headers: Headers | None = None) -> None:
        self.pending.append((topic, key, value, partition, headers, sink, None))

    def discard(self) -> None:
        """Drop what a failed batch queued: its next try queues it again."""
        self.pending.clear()

    async def flush(self, fence: Callable[[], bool] = lambda: True,
                    trailers: Mapping[tuple[faust.Table, int], tuple[str, bytes]] | None = None) -> None:
        """Produce everything queued, then the trailers, and only once both are acknowledged
        write the tables' stores: a flush failing in either request leaves every store as it
        was, so the batch read again finds the state it was processed against (a customers row
        already stored would make its credit count as a re-send, lost from the lifetime value).

        ``fence`` is asked right before producing: a worker whose partitions were revoked
        meanwhile writes nothing (:class:`Revoked`). Each changelog partition written gets a
        last record alone in its request, its trailer or else a tombstone of a key nobody uses:
        brokers answering ListOffsets with the last batch's base offset + 1 (Tansu) would
        otherwise make table recovery stop short of a partition's last records."""
        pending, self.pending = self.pending, []
        if not pending and not trailers:
            return
        if not fence():
            raise Revoked("partitions revoked while the batch was processed: nothing written")
        self.producing = True
        try:
            written = await self._produce(pending)
            ends = dict.fromkeys({(table, item.partition) for table, items in written.items()
                                  for item in items}, (None, None))
            ends.update(trailers or {})
            if ends:
                trailed = await self._produce([
                    (table.changelog_topic.get_topic_name(), key.encode() if key else END_MARKER,
                     value, partition, None, "changelog", table if key else None)
                    for (table, partition), (key, value) in ends.items()
                ])
                for table, items in trailed.items():
                    written.setdefault(table, []).extend(items)
        finally:
            self.producing = False
        for table, items in written.items():
            table.data.apply_changelog_batch(items, _identity, _identity)
        self.on_acked()

    async def _produce(self, pending: list) -> dict[faust.Table, list[_Written]]:
        """Send and await every acknowledgement; the acknowledged table writes, by table (not
        yet in the stores)."""
        results = await self.producer.produce(
            [(topic, key, value, partition, headers)
             for topic, key, value, partition, headers, _, _ in pending])
        failed = None
        for (_, _, _, _, _, sink, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                self.on_error(sink)
                failed = result
        if failed is not None:
            log.error("writes of a batch failed (%s); it will be read again", failed)
            raise failed
        by_table: dict[faust.Table, list[_Written]] = {}
        for (_, key, value, _, _, _, table), result in zip(pending, results, strict=True):
            if table is not None:
                topic, partition, offset = result
                by_table.setdefault(table, []).append(_Written(key, value, TP(topic, partition), offset))
        return by_table
