"""Everything one batch writes — table changelog records and output messages — produced together
and acknowledged before the stores take the table writes.

Faust's own table path sends each changelog record through a 100-message buffer that throttles
the stream one message at a time; here the whole batch goes to the producer at once (which
batches by partition). Changelog records keep Faust's format (raw key/value on
``<app>-<table>-changelog``, the partition of the record they come from), so recovery and
standby replicas work as usual; acknowledged writes reach the store the way recovery applies a
changelog (``Store.apply_changelog_batch``), which also moves RocksDB's persisted offsets.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import faust
from faust.types import TP

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


class Outbox:
    def __init__(self, app: faust.App, on_error: Callable[[str], None],
                 on_acked: Callable[[], None]) -> None:
        self.app = app
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

    async def flush(self, fence: Callable[[], bool] = lambda: True,
                    trailers: Mapping[tuple[faust.Table, int], tuple[str, bytes]] | None = None) -> None:
        """Produce everything queued, wait for the broker's acknowledgements, then write the
        tables' stores. ``fence`` is asked right before producing: a worker whose partitions
        were revoked meanwhile writes nothing (:class:`Revoked`; their next owner redoes it).

        Then each changelog partition written (and each of ``trailers``) gets one last record
        alone in its request: the trailer given for it, else a tombstone of a key nobody uses.
        Brokers that answer ListOffsets with the last batch's base offset + 1 (Tansu) would
        otherwise make table recovery stop before the last records of a partition."""
        pending, self.pending = self.pending, []
        if not pending and not trailers:
            return
        if not fence():
            raise Revoked("partitions revoked while the batch was processed: nothing written")
        self.producing = True
        try:
            tables = await self._produce(pending)
            ends = dict.fromkeys(tables, (None, None))
            ends.update(trailers or {})
            if ends:
                await self._produce([
                    (table.changelog_topic.get_topic_name(), key.encode() if key else END_MARKER,
                     value, partition, None, "changelog", table if key else None)
                    for (table, partition), (key, value) in ends.items()
                ])
        finally:
            self.producing = False
        self.on_acked()

    async def _produce(self, pending: list) -> set[tuple[faust.Table, int]]:
        """Send, await every acknowledgement, apply the table writes; the (table, partition)
        pairs written."""
        producer = self.app.producer
        futures = [await producer.send(topic, key, value, partition, None, headers)
                   for topic, key, value, partition, headers, _, _ in pending]
        results = await asyncio.gather(*futures, return_exceptions=True)
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
                by_table.setdefault(table, []).append(
                    _Written(key, value, TP(result.topic, result.partition), result.offset))
        for table, written in by_table.items():
            table.data.apply_changelog_batch(written, _identity, _identity)
        return {(table, item.partition) for table, written in by_table.items() for item in written}
