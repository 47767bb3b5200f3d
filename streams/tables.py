"""Faust tables of bytes: deals and customers (feeding per-partition folds), erasures, and the
publisher's state."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import faust
from faust.types import TP

from models.aggregates import Contribution
from streams.processor import PartitionFolds
from streams.settings import Settings

log = logging.getLogger("funnel_kpi")


class RawTable(faust.Table):
    """A table of bytes keys and values, written to its changelog as they are.

    Faust derives serializers from model types and falls back to JSON; our values are already
    compact bytes (models.deal), so JSON would only wrap them.
    """

    def __init__(self, app: faust.App, settings: Settings, **kwargs: Any) -> None:
        # RocksDB memory per table partition: block cache + 2 write buffers (Faust's defaults
        # are a 2 GiB cache and 3 × 64 MiB buffers per partition: far too much for small boxes).
        mib = 1024 * 1024
        options = {
            "block_cache_size": settings.rocksdb_block_cache_mb * mib,
            "write_buffer_size": settings.rocksdb_write_buffer_mb * mib,
            "max_write_buffer_number": 2,
        } if settings.store.startswith("rocksdb") else None
        super().__init__(app, key_type=bytes, value_type=bytes, beacon=app.tables.beacon,
                         default=None, options=options, **kwargs)
        self.key_serializer = self.value_serializer = "raw"


class ErasureTable(RawTable):
    """Pseudonyms of erased people; loaded into the deal processor once recovered, so an
    erasure survives restarts and rebalances (events are read only after that)."""

    def __init__(self, app: faust.App, settings: Settings, erased: set[str],
                 on_ready: Callable[[set[int], set[int]], None], **kwargs: Any) -> None:
        super().__init__(app, settings, **kwargs)
        self.erased = erased
        self.on_ready = on_ready

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        self.erased |= {key.decode() for key in list(self.data.keys())}
        self.on_ready(set(), set())


class FoldedTable(RawTable):
    """A table whose values feed in-memory folds of the actively owned partitions only.

    Folds are dropped when partitions are revoked (the worker's ``on_partitions_revoked``: every
    rebalance is eager) and rebuilt from the table once recovery completes, so standby replicas
    (also in this table's store) are never exported.
    """

    def __init__(
        self, app: faust.App, settings: Settings, *, folds: PartitionFolds, source_topic: str,
        contributions: Callable[[Iterable[bytes]], Iterable[tuple[int, Contribution]]],
        on_ready: Callable[[set[int], set[int]], None], **kwargs: Any,
    ) -> None:
        super().__init__(app, settings, **kwargs)
        self.folds = folds
        self.source_topic = source_topic
        self.contributions = contributions
        self.on_ready = on_ready

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        active = {
            tp.partition for tp in self.app.assignor.assigned_actives()
            if tp.topic == self.source_topic
        }
        standby = {
            tp.partition for tp in self.app.assignor.assigned_standbys()
            if tp.topic == self.changelog_topic.get_topic_name()
        }
        self.folds.rebuild(active, self.contributions(
            value for value in self.data.values() if value is not None))
        log.info("%s: aggregates rebuilt for active partitions %s (standby %s, not exported)",
                 self.name, sorted(active), sorted(standby))
        self.on_ready(active, standby)
