"""Faust tables of bytes: deals and customers (feeding per-partition folds) and the publisher's
state; each reports its recovery for the assignment it was recovered for."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import faust
import orjson
from faust.types import TP

from models.aggregates import Contribution
from processors.folds import PartitionFolds
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.worker.loop import is_position_key

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
        changelog = topics.changelog_topic(settings.app_id, kwargs["name"])
        super().__init__(app, key_type=bytes, value_type=bytes, beacon=app.tables.beacon,
                         default=None, options=options,
                         extra_topic_configs=topics.topic_configs(changelog, settings.app_id), **kwargs)
        self.key_serializer = self.value_serializer = "raw"

    def read(self, key: str) -> bytes | None:
        """A stored value. Outside a Faust stream a RocksDB store finds the key's partition by
        itself: a key lives in one partition only."""
        return self.data.get(key.encode())


class FoldedTable(RawTable):
    """A table whose values feed in-memory folds of the actively owned partitions only, and that
    reports a completed recovery to the worker with the group generation it was recovered for.

    Folds are dropped when partitions are revoked (every rebalance is eager) and rebuilt from
    the table once recovery completes, so standby replicas (also in this table's store) are
    never exported. A completion that a rebalance overtook is ignored: Faust may complete the
    recovery of an assignment a later rebalance replaced, and serving it would export and
    process partitions another worker owns.
    """

    def __init__(
        self, app: faust.App, settings: Settings, *, folds: PartitionFolds,
        contributions: Callable[[Iterable[bytes]], Iterable[tuple[int, Contribution]]],
        active: Callable[[], set[int]], on_ready: Callable[[str, int], None], **kwargs: Any,
    ) -> None:
        super().__init__(app, settings, **kwargs)
        self.folds = folds
        self.contributions = contributions
        self.active = active
        self.on_ready = on_ready
        self.generation: int | None = None  # of the assignment being recovered; None: revoked

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP],
                           generation_id: int = 0) -> None:
        self.generation = generation_id  # before Faust starts this assignment's recovery
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        generation = self.generation
        if (generation is None or generation != self.app.consumer_generation_id
                or self.app.tables.recovery.signal_recovery_start.is_set()):
            log.warning("%s: a recovery overtaken by a rebalance completed; ignored", self.name)
            return
        active = self.active()
        self.folds.rebuild(active, self.contributions(
            value for key, value in list(self.data.items())
            if value is not None and not is_position_key(key)))
        log.info("%s: aggregates rebuilt for active partitions %s", self.name, sorted(active))
        self.on_ready(self.name, generation)


def stored_deals(deals: RawTable, partitions: frozenset[int] | None) -> Iterator[tuple[str, bytes]]:
    """Every stored deal of the given partitions, of all with None (erasures, undoing a failed
    batch: a full scan)."""
    for key, value in list(deals.data.items()):
        if value is not None and not is_position_key(key) and (
                partitions is None or orjson.loads(value)[2] in partitions):
            yield key.decode(), value
