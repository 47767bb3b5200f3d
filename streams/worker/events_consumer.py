"""``crm.events`` consumed in batches with aiokafka, beside Faust instead of through its stream.

Faust's per-event delivery (consumer-thread hand-off, conductor, channel queues, Event objects,
sensors, acks) costs ~60 µs per event before any funnel code runs (bench/PROFILE.md). Here a
plain ``AIOKafkaConsumer`` without a group reads the ``crm.events`` partitions whose ticks
partition (co-partitioned with the deals table) Faust assigned to this worker as active, once
the tables are recovered. Faust keeps group membership, assignment, tables, changelogs, recovery
and standbys; offsets are committed to Faust's group, through its member, after each batch's
writes are acknowledged, so lag tooling and restarts see them as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    IllegalStateError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import Gauge

from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.worker.outbox import Revoked

log = logging.getLogger("funnel_kpi.events")
# After a failed batch (its writes were not acknowledged): wait, then re-read it.
RETRY_SECONDS = 1.0
# Commit errors that mean this worker is no longer a member of the group's current generation.
MEMBERSHIP_LOST = (CommitFailedError, IllegalGenerationError, UnknownMemberIdError,
                   RebalanceInProgressError)


class FaustGroup:
    """Committed offsets of Faust's consumer group, read and written through Faust's own member.

    Kafka accepts commits only from a member of the current generation; it does not check that
    the partitions are in the member's assignment, so ``crm.events`` offsets can be committed
    though Faust no longer subscribes to it (and Faust's own commits never touch them).
    """

    def __init__(self, app: faust.App) -> None:
        self.app = app

    async def _in_consumer_thread(self, fun: Callable[[Any], Awaitable[Any]]) -> Any:
        thread = self.app.consumer._thread  # type: ignore[attr-defined]

        async def call() -> Any:
            return await fun(thread._ensure_consumer()._coordinator)
        return await thread.call_thread(call)

    async def committed(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        found = await self._in_consumer_thread(lambda coord: coord.fetch_committed_offsets(tps))
        return {tp: meta.offset for tp, meta in found.items() if meta is not None and meta.offset >= 0}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        data = {tp: OffsetAndMetadata(offset, "") for tp, offset in offsets.items()}
        await self._in_consumer_thread(lambda coord: coord.commit_offsets(None, data))


class EventsConsumer:
    """Reads the assigned ``crm.events`` partitions and hands each fetched batch to ``handle``.

    Assignment changes and batches are serialised by one lock: :meth:`revoke` returns only once
    the batch in flight has been written, acknowledged and committed, before Faust hands the
    tables elsewhere.
    """

    def __init__(self, app: faust.App, settings: Settings, lag_gauge: Gauge,
                 handle: Callable[[list[Any]], Awaitable[None]],
                 on_lost: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.on_lost = on_lost
        self.revocations = 0  # a batch commits only if no revoke came while it ran
        self.group = FaustGroup(app)
        self.lag_gauge = lag_gauge
        self.handle = handle
        self.consumer: AIOKafkaConsumer | None = None
        self.positions: dict[int, int] = {}  # next offset to process, per assigned partition
        self._assigned: frozenset[int] = frozenset()
        self._wanted: frozenset[int] = frozenset()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def assign(self, partitions: set[int]) -> None:
        """Tables are recovered for these active partitions: start reading them."""
        self._wanted = frozenset(partitions)
        self._wake.set()

    def _fence(self) -> None:
        """Read nothing more, and fence the batch in flight (its revocation count is stale)."""
        self._wanted = frozenset()
        self.revocations += 1

    async def revoke(self) -> None:
        """Stop reading; returns after the batch in flight is done, or after half the rebalance
        timeout (a worker that overstays it is dropped from the group while it still writes).
        A batch that outlives a revoke neither writes (``FunnelWorker``) nor commits."""
        self._fence()
        self._wake.clear()
        try:
            await asyncio.wait_for(self._lock.acquire(), self.settings.rebalance_timeout / 2)
        except TimeoutError:
            log.warning("a batch still in flight at a revoke: fenced off, it writes nothing more")
            return
        try:
            await self._apply_assignment()
        finally:
            self._lock.release()

    async def lag(self, partition: int) -> int:
        """Events of a partition not processed yet (fetched ones included); 0 while the
        partition is not read or before its first fetch."""
        tp = TopicPartition(topics.EVENTS, partition)
        if self.consumer is None or partition not in self._assigned:
            return 0
        highwater = self.consumer.highwater(tp)
        if highwater is None:
            return 0
        position = self.positions.get(partition)
        if position is None:  # nothing processed or committed yet: where the consumer stands
            try:
                position = await self.consumer.position(tp)
            except IllegalStateError:  # unassigned meanwhile (a rebalance)
                return 0
        return max(highwater - position, 0)

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
                async with self._lock:
                    if self._wanted != self._assigned:
                        await self._apply_assignment()
                    if self._assigned:
                        await self._next_batch()
                    else:
                        self._wake.clear()
        finally:
            await self.consumer.stop()

    async def _apply_assignment(self) -> None:
        consumer = self.consumer
        if consumer is None:
            return
        wanted = self._wanted
        for partition in self._assigned - wanted:
            self.positions.pop(partition, None)
            with contextlib.suppress(KeyError):
                self.lag_gauge.remove(topics.EVENTS, str(partition))
        tps = [TopicPartition(topics.EVENTS, p) for p in sorted(wanted)]
        if not tps:
            consumer.unsubscribe()
            self._assigned = wanted
            return
        consumer.assign(tps)
        await self._seek_to_committed(tps)
        self._assigned = wanted
        log.info("reading %s partitions %s", topics.EVENTS, sorted(wanted))

    async def _seek_to_committed(self, tps: list[TopicPartition]) -> None:
        """Resume where the group committed; partitions it never committed start at the
        beginning (also after a failed batch: its records are read again, see F7)."""
        assert self.consumer is not None
        committed = await self.group.committed(tps)
        for tp in tps:
            offset = committed.get(tp)
            if offset is not None:
                self.consumer.seek(tp, offset)
                self.positions[tp.partition] = offset
            else:
                await self.consumer.seek_to_beginning(tp)
                self.positions.pop(tp.partition, None)

    async def _next_batch(self) -> None:
        assert self.consumer is not None
        fetched = await self.consumer.getmany(
            timeout_ms=self.settings.fetch_max_wait_ms, max_records=self.settings.batch_size,
        )
        if not fetched:
            return
        records = [record for messages in fetched.values() for record in messages]
        offsets = {tp: messages[-1].offset + 1 for tp, messages in fetched.items()}
        # On every fetch, so a partition whose batch keeps failing shows its lag growing.
        self._report_lag({tp: messages[0].offset for tp, messages in fetched.items()})
        revocations = self.revocations
        try:
            await self.handle(records)
        except Revoked:
            # Nothing written: whoever owns these partitions next (maybe this worker again, with
            # the same assignment) reads them again.
            await self._seek_to_committed(list(fetched))
            return
        except Exception:
            log.exception("a batch of %d events failed; re-reading it in %.0f s",
                          len(records), RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)
            await self._seek_to_committed(list(fetched))
            return
        if revocations != self.revocations:
            return  # written before the revoke fenced it; the next owner re-reads (duplicates)
        for tp, offset in offsets.items():
            self.positions[tp.partition] = offset
        self._report_lag(offsets)
        try:
            await self.group.commit(offsets)
        except MEMBERSHIP_LOST as exc:
            # The group has moved on without this worker (or is rebalancing): its partitions
            # may be someone else's already. Stop as on a revoke; Faust rejoins and reassigns.
            log.warning("commit of %s offsets refused (%r): stopping as on a revoke",
                        topics.EVENTS, exc)
            self._fence()
            self.on_lost()
        except KafkaError as exc:  # e.g. a timeout: the next commit covers these offsets
            log.warning("commit of %s offsets failed: %r", topics.EVENTS, exc)

    def _report_lag(self, offsets: dict[TopicPartition, int]) -> None:
        assert self.consumer is not None
        for tp, position in offsets.items():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                self.lag_gauge.labels(tp.topic, str(tp.partition)).set(max(highwater - position, 0))
