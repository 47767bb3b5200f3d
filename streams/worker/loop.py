"""The one batch loop: every input that changes state goes through it.

One group-less consumer reads, for each partition whose tables Faust recovered here,
``crm.events`` and the customer credits, and the whole of ``funnel.erasures``; the owner of
partition 0 (the KPI publisher) also reads the partials. Each fetch, with the stall checks due,
goes to the worker's ``handle``, one batch at a time. The positions in the partitioned inputs
are stored with the state they produced: a position row in the ``deals`` table, written after
the batch's acknowledgements and restored by table recovery (a group's committed offsets of
topics it does not subscribe to expire). Erasures are read from their beginning at every
assignment (idempotent), partials from their end (only those sent since the take-over count).

One assignment epoch fences everything: the group generation whose tables were recovered. A
revoke clears it, so a batch in flight writes nothing (:class:`Revoked`), and waits for that
batch; if its writes are still unconfirmed after half the rebalance timeout the process exits:
the group moves on without a member that overstays, and a write landing after the next
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
RETRY_SECONDS = 1.0  # after a failed batch (writes not acknowledged), before reading it again
# Stall checks wait while a partition is further behind (a backlog's stream clock runs ahead
# of deals whose later events are still queued).
MAX_CHECK_LAG = 1000
EXIT_UNCONFIRMED_WRITES = 75  # EX_TEMPFAIL


def position_key(partition: int) -> str:
    """The deals-table key of a partition's position row (no deal id starts with NUL)."""
    return f"\x00position:{partition}"


def is_position_key(key: bytes) -> bool:
    return key.startswith(b"\x00")


@dataclass(slots=True)
class Batch:
    """One fetch: records by input topic, the position rows after them, the stall checks due."""

    epoch: int
    records: dict[str, list[Record]]
    positions: dict[int, dict[str, int]]  # partition → topic → next offset, of partitions fetched
    stall_checks: list[int]


class Positions:
    """The next offset of each input partition read: those of the co-partitioned ``inputs``
    come from and go to the position rows; the shared inputs' last one assignment."""

    def __init__(self, inputs: list[str], erasures: str, partials: str, lag_gauge: Gauge,
                 stored: Callable[[int], bytes | None]) -> None:
        self.inputs, self.erasures, self.partials = inputs, erasures, partials
        self.lag_gauge = lag_gauge
        self.stored = stored
        self.next: dict[TopicPartition, int] = {}

    def topic_partitions(self, partitions: frozenset[int]) -> list[TopicPartition]:
        shared = [self.erasures, self.partials] if 0 in partitions else [self.erasures]
        # The shared ones first: erasures are positioned (and read) before the events.
        return ([TopicPartition(topic, 0) for topic in shared]
                + [TopicPartition(topic, p) for p in sorted(partitions) for topic in self.inputs])

    def reassign(self, dropped: frozenset[int], assigned: frozenset[int]) -> None:
        for partition in dropped:
            for topic in self.inputs:
                with contextlib.suppress(KeyError):
                    self.lag_gauge.remove(topic, str(partition))
        self.next = {}
        for partition in assigned:
            row = self.stored(partition)
            for topic, offset in (orjson.loads(row) if row else {}).items():
                self.next[TopicPartition(topic, partition)] = offset

    async def seek(self, consumer: AIOKafkaConsumer, assigned: frozenset[int]) -> None:
        """To the stored positions; an input never read from its beginning, the partials from
        their end."""
        for tp in self.topic_partitions(assigned):
            if tp in self.next:
                consumer.seek(tp, self.next[tp])
            elif tp.topic == self.partials:
                await consumer.seek_to_end(tp)
            else:
                await consumer.seek_to_beginning(tp)

    def after(self, fetched: dict[TopicPartition, list]) -> tuple[dict[int, dict[str, int]],
                                                                  dict[TopicPartition, int]]:
        """The position rows of the partitions a fetch moved (an idle one writes nothing), and
        every next offset after it."""
        moved = {**self.next, **{tp: messages[-1].offset + 1 for tp, messages in fetched.items()}}
        rows = {tp.partition: {topic: moved[TopicPartition(topic, tp.partition)]
                               for topic in self.inputs if TopicPartition(topic, tp.partition) in moved}
                for tp in fetched if tp.topic in self.inputs}
        return rows, moved

    def lag(self, consumer: AIOKafkaConsumer, partition: int) -> int:
        """``crm.events`` records of a partition not processed yet."""
        tp = TopicPartition(self.inputs[0], partition)
        highwater = consumer.highwater(tp)
        return max(highwater - self.next.get(tp, 0), 0) if highwater is not None else 0

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
                 lag_gauge: Gauge, handle: Callable[[Batch], Awaitable[None]],
                 stored_position: Callable[[int], bytes | None],
                 producing: Callable[[], bool]) -> None:
        self.settings = settings
        self.topics = [*inputs, erasures, partials]  # crm.events first: its lag gates stall checks
        self.positions = Positions(inputs, erasures, partials, lag_gauge, stored_position)
        self.handle = handle
        self.producing = producing
        self.epoch: int | None = None
        self.consumer: AIOKafkaConsumer | None = None
        self._assigned: tuple[frozenset[int], int | None] = (frozenset(), None)
        self._wanted: frozenset[int] = frozenset()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._next_check = 0.0

    def assign(self, partitions: set[int], epoch: int) -> None:
        """Tables are recovered for these active partitions in group generation ``epoch``."""
        self.epoch, self._wanted = epoch, frozenset(partitions)
        self._wake.set()

    async def revoke(self) -> None:
        """Fence the batch in flight and read nothing more; return once that batch is done."""
        self.epoch, self._wanted = None, frozenset()
        self._wake.set()
        wait = self.settings.rebalance_timeout / 2
        try:
            await asyncio.wait_for(self._idle.wait(), wait)
        except TimeoutError:
            if self.producing():
                log.critical("a revoked batch's writes are still unconfirmed after %.0f s: exiting "
                             "so they cannot land after the next owner's", wait)
                os._exit(EXIT_UNCONFIRMED_WRITES)
            log.warning("a batch still in flight at a revoke: fenced off, it writes nothing")

    async def _apply_assignment(self) -> None:
        assert self.consumer is not None
        wanted = self._wanted
        self.positions.reassign(self._assigned[0] - wanted, wanted)
        self._assigned = (wanted, self.epoch)
        if not wanted:
            self.consumer.unsubscribe()
            return
        self.consumer.assign(self.positions.topic_partitions(wanted))
        await self.positions.seek(self.consumer, wanted)
        # The first check waits an interval: until the first fetches, no backlog is known.
        self._next_check = time.monotonic() + self.settings.tick_interval
        log.info("reading %s partitions %s (epoch %s)", ", ".join(self.positions.inputs),
                 sorted(wanted), self.epoch)

    async def run(self) -> None:
        self.consumer = AIOKafkaConsumer(
            **kafka_client.client_args(self.settings.broker), enable_auto_commit=False,
            auto_offset_reset="earliest", fetch_max_wait_ms=self.settings.fetch_max_wait_ms)
        await self.consumer.start()
        try:
            while True:
                await self._wake.wait()
                if (self._wanted, self.epoch) != self._assigned:
                    await self._apply_assignment()
                if self._assigned[0] and self.epoch is not None:
                    await self._next_batch(self.epoch)
                else:
                    self._wake.clear()
        finally:
            await self.consumer.stop()

    async def _next_batch(self, epoch: int) -> None:
        assert self.consumer is not None
        fetched = await self.consumer.getmany(
            timeout_ms=self.settings.fetch_max_wait_ms, max_records=self.settings.batch_size)
        if epoch != self.epoch or self._wanted != self._assigned[0]:
            return  # the assignment changed meanwhile: seek from the stored positions first
        checks = self._checks_due()
        if not fetched and not checks:
            return
        rows, moved = self.positions.after(fetched)
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
            self.positions.next = moved
            self.positions.report_lag(self.consumer, fetched, done=True)

    def _seek_back(self, fetched: dict) -> None:
        """To where the batch started (a seek to the beginning or end waits for the fetcher,
        which after a broker outage could wait for good)."""
        if self.epoch is not None and self._wanted == self._assigned[0]:
            for tp, messages in fetched.items():
                self.consumer.seek(tp, messages[0].offset)  # type: ignore[union-attr]

    def _checks_due(self) -> list[int]:
        """Every tick interval, the owned partitions not catching up a backlog."""
        now = time.monotonic()
        if now < self._next_check:
            return []
        self._next_check = now + self.settings.tick_interval
        return [p for p in sorted(self._assigned[0]) if self.lag(p) <= MAX_CHECK_LAG]

    def lag(self, partition: int) -> int:
        if self.consumer is None or partition not in self._assigned[0]:
            return 0
        return self.positions.lag(self.consumer, partition)
