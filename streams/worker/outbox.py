"""Everything one batch writes — table changelog records and output messages — produced together
and awaited before the batch's offsets can be committed.

Faust's own table path sends each changelog record through a 100-message buffer that throttles
the stream one message at a time; here the whole batch goes to the producer at once (which
batches by partition) and is acknowledged before the batch is acked. Changelog records keep
Faust's format (raw key/value on ``<app>-<table>-changelog``, same partition as the source
event), so recovery and standby replicas work as usual.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import faust
from aiokafka.errors import KafkaError
from faust.streams import _current_event  # the context Faust stores read to pick a partition
from faust.types import TP

log = logging.getLogger("funnel_kpi.outbox")
Headers = list[tuple[str, bytes]]
END_MARKER = b"\x00funnel-kpi:end-of-batch"


class Revoked(Exception):
    """A batch fenced off: its partitions were revoked before it wrote anything."""


class _PartitionEvent:
    """Stands in for a Faust event: stores only read ``event.message.partition``."""

    __slots__ = ("__weakref__", "message", "partition")

    def __init__(self, partition: int) -> None:
        self.message = self
        self.partition = partition


# partition → (stand-in, weak reference to it: what Faust's context holds)
_PARTITIONS: dict[int, tuple[_PartitionEvent, weakref.ref]] = {}


def in_partition(partition: int, fun: Callable[..., Any], *args: Any) -> Any:
    """Run a table read/write for a key of ``partition``.

    Batches run outside Faust's per-event context, and the events consumer has no Faust events
    at all; stores read that context to pick the key's partition (RocksDB keeps one database per
    partition), so set it to a stand-in for the partition.
    """
    entry = _PARTITIONS.get(partition)
    if entry is None:
        event = _PartitionEvent(partition)
        entry = _PARTITIONS[partition] = (event, weakref.ref(event))
    token = _current_event.set(entry[1])
    try:
        return fun(*args)
    finally:
        _current_event.reset(token)


class Outbox:
    def __init__(self, app: faust.App, on_error: Callable[[str], None],
                 on_acked: Callable[[], None]) -> None:
        self.app = app
        self.on_error = on_error
        self.on_acked = on_acked
        self.pending: list[tuple[str, bytes | None, bytes | None, int | None, Headers | None, str,
                                 faust.Table | None]] = []
        self.crash_after = int(os.environ.get("FUNNEL_TEST_CRASH_AFTER_WRITES", "0"))
        self.writes = 0
        # Test hooks (reliability tests only): the first N alerts fail as a broker refusal would
        # (they are not produced); or the process dies once everything else of a flush holding
        # alerts is acknowledged, before its alerts are sent.
        self.fail_alerts = int(os.environ.get("FUNNEL_TEST_FAIL_ALERT_SENDS", "0"))
        self.crash_before_alerts = os.environ.get("FUNNEL_TEST_CRASH_BEFORE_ALERTS") == "1"
        # The first N flushes with table writes wait this long before producing (a slow broker).
        self.slow_flushes = int(os.environ.get("FUNNEL_TEST_SLOW_FLUSHES", "0"))
        self.slow_seconds = float(os.environ.get("FUNNEL_TEST_SLOW_FLUSH_SECONDS", "0"))

    def put(self, table: faust.Table, key: str, value: bytes | None, partition: int) -> None:
        """Queue a table write (``None`` deletes the key: a tombstone in the changelog). The
        store takes it once the changelog has it: a batch that fails or is fenced by a revoke
        leaves the store as it was, like the folds."""
        raw_key = key.encode()
        self.pending.append((table.changelog_topic.get_topic_name(), raw_key, value, partition,
                             None, "changelog", table))
        self.writes += 1

    def send(self, topic: str, key: bytes | None, value: bytes, *, sink: str,
             partition: int | None = None, headers: Headers | None = None) -> None:
        self.pending.append((topic, key, value, partition, headers, sink, None))

    async def _end_markers(self, changelogs: set[tuple[str, int | None]]) -> None:
        """A tombstone of a key nobody uses, alone in its batch, after each batch of changelog
        records. Brokers that answer ListOffsets with the last batch's base offset + 1 (Tansu)
        would otherwise make table recovery stop before the last records of a partition."""
        producer = self.app.producer
        futures = [await producer.send(topic, END_MARKER, None, partition, None, None)
                   for topic, partition in changelogs]
        await asyncio.gather(*futures)

    async def flush(self, still_ours: Callable[[], bool] = lambda: True) -> None:
        """Produce everything queued, wait for the broker's acknowledgements, then write the
        tables' stores. ``still_ours`` is asked right before producing: a worker whose partitions
        were revoked meanwhile writes nothing (:class:`Revoked`; their next owner redoes it)."""
        pending, self.pending = self.pending, []
        if self.slow_flushes and any(item[6] is not None for item in pending):
            self.slow_flushes -= 1
            log.warning("FUNNEL_TEST_SLOW_FLUSHES: holding a batch for %.0f s", self.slow_seconds)
            await asyncio.sleep(self.slow_seconds)
        if pending and not still_ours():
            raise Revoked("partitions revoked while the batch was processed: nothing written")
        producer = self.app.producer
        if self.crash_before_alerts and any(item[5] == "alerts" for item in pending):
            await self._crash_before_alerts(pending)
        futures = []
        for topic, key, value, partition, headers, sink, _ in pending:
            if self.fail_alerts and sink == "alerts":
                self.fail_alerts -= 1
                futures.append(_refused(topic))
                continue
            futures.append(await producer.send(topic, key, value, partition, None, headers))
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = None
        for (_, _, _, _, _, sink, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                self.on_error(sink)
                failed = result
        if failed is not None:
            log.error("writes of a batch failed (%s); its offsets stay uncommitted", failed)
            raise failed
        changelogs = set()
        for (topic, key, value, partition, _, _, table), result in zip(pending, results, strict=True):
            if table is None:
                continue
            if value is None:
                in_partition(partition, table.data.pop, key, None)
            else:
                in_partition(partition, table.data.__setitem__, key, value)
            # What Faust does for its own changelog writes: RocksDB remembers how far the
            # changelog is reflected locally, so a restart reads only the rest.
            table.data.set_persisted_offset(TP(result.topic, result.partition), result.offset)
            changelogs.add((topic, partition))
        if changelogs:
            await self._end_markers(changelogs)
        if pending:
            self.on_acked()
        if self.crash_after and self.writes >= self.crash_after:
            # Test hook (crash tests only): die once the batch's table writes are acknowledged
            # and before its offsets are committed, the most dangerous point for double counting.
            log.warning("FUNNEL_TEST_CRASH_AFTER_WRITES reached: exiting hard")
            os._exit(137)

    async def _crash_before_alerts(self, pending: list) -> None:
        others = [await self.app.producer.send(topic, key, value, partition, None, headers)
                  for topic, key, value, partition, headers, sink, _ in pending if sink != "alerts"]
        await asyncio.gather(*others)
        log.warning("FUNNEL_TEST_CRASH_BEFORE_ALERTS: exiting hard before the alerts are sent")
        os._exit(137)


def _refused(topic: str) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_exception(KafkaError(f"FUNNEL_TEST_FAIL_ALERT_SENDS: {topic} refused"))
    return future
