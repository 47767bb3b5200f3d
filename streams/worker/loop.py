"""The one batch loop: every input that changes state goes through it.

One group-less ``AIOKafkaConsumer`` reads, for each partition whose tables Faust recovered for
this worker, ``crm.events`` and the customer credits, and the whole of ``funnel.erasures``; the
owner of partition 0 also reads the partials of every partition (it is the KPI publisher). It
hands each fetched batch — with the stall checks that are due — to the worker's ``handle``, one
batch at a time. Where it stands in each partitioned input is stored with the state it
produced: a position row in the ``deals`` table, written after the batch's writes are
acknowledged, restored by table recovery, and never expired by the broker (a group's committed
offsets of topics it does not subscribe to are deleted after ``offsets.retention.minutes``).
The erasures are read from their beginning at every assignment (applying one again changes
nothing), the partials from their end (only those sent since the take-over count). Faust keeps
group membership, assignment, changelog recovery and standbys; its agents carry nothing.

One assignment epoch fences everything: the consumer-group generation whose tables were
recovered. A revoke clears it, so a batch in flight writes nothing (:class:`Revoked`), and waits
for that batch; a batch whose writes are already on their way when the revoke has waited half
the rebalance timeout makes the process exit, because on Apache Kafka the group moves on
without a member that overstays the rebalance timeout, and a write landing after the next
owner's would be kept by compaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Gauge

from processors.records import Record
from streams.kafka import client as kafka_client
from streams.kafka.settings import Settings
from streams.worker.outbox import Revoked

log = logging.getLogger("funnel_kpi.loop")
# After a failed batch (its writes were not acknowledged): wait, then read it again.
RETRY_SECONDS = 1.0
# Stall checks wait while a partition is further behind than this (a backlog's stream clock
# runs ahead of deals whose later events are still queued).
MAX_CHECK_LAG = 1000
# Exit status when a revoked batch's writes could not be confirmed in time (EX_TEMPFAIL).
EXIT_UNCONFIRMED_WRITES = 75


def position_key(partition: int) -> str:
    """The deals-table key of a partition's position row (no deal id starts with NUL)."""
    return f"\x00position:{partition}"


def is_position_key(key: bytes) -> bool:
    return key.startswith(b"\x00")


@dataclass(slots=True)
class Batch:
    """One fetch: records by input topic, the positions after them, the stall checks due."""

    epoch: int
    records: dict[str, list[Record]]
    positions: dict[int, dict[str, int]]  # partition → topic → next offset, of partitions fetched
    stall_checks: list[int]


class Positions:
    """Where the loop stands in each input: per partition of the co-partitioned inputs (as the
    position rows store it), and per shared input for the current assignment only."""

    def __init__(self, inputs: list[str], erasures: str, partials: str, lag_gauge: Gauge,
                 stored: Callable[[int], bytes | None]) -> None:
        self.inputs, self.erasures, self.partials = inputs, erasures, partials
        self.lag_gauge = lag_gauge
        self.stored = stored
        self.by_partition: dict[int, dict[str, int]] = {}
        self.shared: dict[str, int] = {}

    def shared_topics(self, partitions: frozenset[int]) -> list[str]:
        """The owner of partition 0 is the KPI publisher: it also reads the partials."""
        return [self.erasures, self.partials] if 0 in partitions else [self.erasures]

    def topic_partitions(self, partitions: frozenset[int]) -> list[TopicPartition]:
        return ([TopicPartition(topic, p) for p in sorted(partitions) for topic in self.inputs]
                + [TopicPartition(topic, 0) for topic in self.shared_topics(partitions)])

    def reassign(self, dropped: frozenset[int], added: frozenset[int]) -> None:
        for partition in dropped:
            self.by_partition.pop(partition, None)
            for topic in self.inputs:
                with contextlib.suppress(KeyError):
                    self.lag_gauge.remove(topic, str(partition))
        for partition in added:
            raw = self.stored(partition)
            self.by_partition[partition] = orjson.loads(raw) if raw else {}
        self.shared = {}

    async def seek(self, consumer: AIOKafkaConsumer, assigned: frozenset[int]) -> None:
        """Back to the stored positions; an input never read starts at its beginning, except
        the partials: only those sent since the take-over count."""
        for topic in self.shared_topics(assigned):
            tp = TopicPartition(topic, 0)
            if topic in self.shared:
                consumer.seek(tp, self.shared[topic])
            elif topic == self.partials:
                await consumer.seek_to_end(tp)
            else:
                await consumer.seek_to_beginning(tp)
        for partition in assigned:
            stored = self.by_partition.get(partition, {})
            for topic in self.inputs:
                tp = TopicPartition(topic, partition)
                if topic in stored:
                    consumer.seek(tp, stored[topic])
                else:
                    await consumer.seek_to_beginning(tp)

    def after(self, fetched: dict[TopicPartition, list]) -> tuple[dict[int, dict[str, int]], dict[str, int]]:
        """The positions after a fetch: rows only for the partitions it moved (an idle partition
        writes nothing), and the shared inputs'."""
        rows: dict[int, dict[str, int]] = {}
        shared = dict(self.shared)
        for tp, messages in fetched.items():
            if tp.topic not in self.inputs:
                shared[tp.topic] = messages[-1].offset + 1
                continue
            row = rows.get(tp.partition)
            if row is None:
                row = rows[tp.partition] = dict(self.by_partition.get(tp.partition, {}))
            row[tp.topic] = messages[-1].offset + 1
        return rows, shared

    def lag(self, consumer: AIOKafkaConsumer | None, partition: int) -> int:
        """``crm.events`` records of a partition not processed yet (0 before its first fetch)."""
        if consumer is None or partition not in self.by_partition:
            return 0
        highwater = consumer.highwater(TopicPartition(self.inputs[0], partition))
        position = self.by_partition[partition].get(self.inputs[0], 0)
        return max(highwater - position, 0) if highwater is not None else 0

    def report_lag(self, consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, list],
                   done: bool) -> None:
        """Each fetched input partition's lag: from the batch's start, or once ``done`` its end."""
        for tp, messages in fetched.items():
            highwater = consumer.highwater(tp)
            if tp.topic in self.inputs and highwater is not None:
                position = messages[-1].offset + 1 if done else messages[0].offset
                self.lag_gauge.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))


class BatchLoop:
    def __init__(self, settings: Settings, inputs: list[str], erasures: str, partials: str,
                 lag_gauge: Gauge,
                 handle: Callable[[Batch], Awaitable[None]],
                 stored_position: Callable[[int], bytes | None],
                 producing: Callable[[], bool]) -> None:
        self.settings = settings
        # co-partitioned inputs, crm.events first (its lag gates the stall checks), and the
        # shared ones (one partition each)
        self.topics = [*inputs, erasures, partials]
        self.positions = Positions(inputs, erasures, partials, lag_gauge, stored_position)
        self.handle = handle
        self.producing = producing
        self.epoch: int | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._assigned: frozenset[int] = frozenset()
        self._assigned_epoch: int | None = None
        self._wanted: frozenset[int] = frozenset()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._next_check = 0.0

    # -- assignment ----------------------------------------------------------------------------

    def assign(self, partitions: set[int], epoch: int) -> None:
        """Tables are recovered for these active partitions in group generation ``epoch``."""
        self.epoch = epoch
        self._wanted = frozenset(partitions)
        self._wake.set()

    async def revoke(self) -> None:
        """Fence the batch in flight and read nothing more; return once that batch is done."""
        self.epoch = None
        self._wanted = frozenset()
        self._wake.set()
        try:
            await asyncio.wait_for(self._idle.wait(), self.settings.rebalance_timeout / 2)
        except TimeoutError:
            if self.producing():
                log.critical("a revoked batch's writes are still unconfirmed after %.0f s: exiting "
                             "so they cannot land after the next owner's",
                             self.settings.rebalance_timeout / 2)
                os._exit(EXIT_UNCONFIRMED_WRITES)
            log.warning("a batch still in flight at a revoke: fenced off, it writes nothing")

    async def _apply_assignment(self) -> None:
        assert self.consumer is not None
        wanted, epoch = self._wanted, self.epoch
        self.positions.reassign(self._assigned - wanted, wanted)
        self._assigned, self._assigned_epoch = wanted, epoch
        if not wanted:
            self.consumer.unsubscribe()
            return
        self.consumer.assign(self.positions.topic_partitions(wanted))
        await self.positions.seek(self.consumer, wanted)
        # The first check waits an interval: until the first fetches, no backlog is known.
        self._next_check = time.monotonic() + self.settings.tick_interval
        log.info("reading %s partitions %s (epoch %s)", ", ".join(self.positions.inputs),
                 sorted(wanted), epoch)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        self.consumer = AIOKafkaConsumer(
            **kafka_client.client_args(self.settings.broker),
            enable_auto_commit=False, auto_offset_reset="earliest",
            fetch_max_wait_ms=self.settings.fetch_max_wait_ms,
        )
        await self.consumer.start()
        try:
            while True:
                await self._wake.wait()
                if (self._wanted, self.epoch) != (self._assigned, self._assigned_epoch):
                    await self._apply_assignment()
                if not self._assigned or self.epoch is None:
                    self._wake.clear()
                    continue
                await self._next_batch(self.epoch)
        finally:
            await self.consumer.stop()

    async def _next_batch(self, epoch: int) -> None:
        assert self.consumer is not None
        fetched = await self.consumer.getmany(
            timeout_ms=self.settings.fetch_max_wait_ms, max_records=self.settings.batch_size,
        )
        if epoch != self.epoch or self._wanted != self._assigned:
            return  # the assignment changed meanwhile: seek from the stored positions first
        checks = self._checks_due()
        if not fetched and not checks:
            return
        rows, shared = self.positions.after(fetched)
        batch = Batch(epoch, {topic: [] for topic in self.topics}, rows, checks)
        for tp, messages in fetched.items():
            batch.records[tp.topic].extend(messages)
        self.positions.report_lag(self.consumer, fetched, done=False)
        self._idle.clear()
        try:
            await self.handle(batch)
        except Revoked:
            self._seek_back(fetched)  # nothing written: whoever owns them next reads them
            return
        except Exception:
            log.exception("a batch of %d records failed; reading it again in %.0f s",
                          sum(map(len, fetched.values())), RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)
            self._seek_back(fetched)
            return
        finally:
            self._idle.set()
        if epoch == self.epoch:
            self.positions.by_partition.update(rows)
            self.positions.shared = shared
            self.positions.report_lag(self.consumer, fetched, done=True)

    def _seek_back(self, fetched: dict) -> None:
        """To the first record fetched of each partition: where the batch started. (A seek to
        the beginning or the end waits for the fetcher, which after a broker outage could wait
        for good.)"""
        if self.epoch is not None and self._wanted == self._assigned:
            for tp, messages in fetched.items():
                self.consumer.seek(tp, messages[0].offset)  # type: ignore[union-attr]

    def _checks_due(self) -> list[int]:
        """Every tick interval, the owned partitions not catching up a backlog."""
        now = time.monotonic()
        if now < self._next_check:
            return []
        self._next_check = now + self.settings.tick_interval
        return [p for p in sorted(self._assigned) if self.lag(p) <= MAX_CHECK_LAG]

    def lag(self, partition: int) -> int:
        return self.positions.lag(self.consumer, partition) if partition in self._assigned else 0
