"""Faust tables of bytes: deals and customers (feeding per-partition folds), erasures, and the
publisher's state."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import faust
from faust.types import TP

from models.aggregates import Contribution
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.worker.processor import PartitionFolds

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


class Rebalances:
    """Which assignment is current. Faust may complete the recovery of an assignment that a
    later rebalance replaced; rebuilding folds and reading events then would export and process
    partitions another worker owns, so such a completion is ignored (the current assignment's
    own completion follows)."""

    def __init__(self) -> None:
        self.revocations = 0
        self.assigned_after = -1  # revocations seen when the tables last got an assignment
        self.revoke = asyncio.Event()  # set, and replaced, at each revoke (for a test hook)

    def revoked(self) -> None:
        self.revocations += 1
        self.revoke.set()  # wakes whoever waits for this revoke
        self.revoke = asyncio.Event()

    def assigned(self) -> None:
        self.assigned_after = self.revocations

    def overtaken(self, app: faust.App) -> bool:
        """A revoke came after the last assignment, or a newer assignment awaits recovery."""
        return (self.assigned_after != self.revocations
                or app.tables.recovery.signal_recovery_start.is_set())


class RecoveredTable(RawTable):
    """A table that reports its completed recovery to the worker, unless a rebalance has
    overtaken it."""

    def __init__(self, app: faust.App, settings: Settings, *, rebalances: Rebalances,
                 on_ready: Callable[[set[int], set[int]], None], **kwargs: Any) -> None:
        super().__init__(app, settings, **kwargs)
        self.rebalances = rebalances
        self.on_ready = on_ready
        # Tests only: each recovery completion is held this long, or until a revoke comes.
        self.slow_recovery = float(os.environ.get("FUNNEL_TEST_SLOW_RECOVERY_SECONDS", "0"))

    async def on_rebalance(self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP],
                           generation_id: int = 0) -> None:
        self.rebalances.assigned()  # before Faust starts this assignment's recovery
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        await super().on_recovery_completed(active_tps, standby_tps)
        if self.slow_recovery:
            await self._hold_completion()
        if self.rebalances.overtaken(self.app):
            log.warning("%s: a recovery overtaken by a rebalance completed; ignored", self.name)
            return
        self.recovered()

    async def _hold_completion(self) -> None:
        """``FUNNEL_TEST_SLOW_RECOVERY_SECONDS``: a completion released by a revoke arrives when
        Faust's own stale completions do (its recovery's last round trips answered while the
        group rebalances, before the next assignment); Faust runs table callbacks as tasks of
        their own, so a revoke or a new assignment meanwhile does not cancel them."""
        log.warning("FUNNEL_TEST_SLOW_RECOVERY_SECONDS: %s: holding a recovery completion", self.name)
        try:
            await asyncio.wait_for(self.rebalances.revoke.wait(), self.slow_recovery)
            log.warning("FUNNEL_TEST_SLOW_RECOVERY_SECONDS: %s: completion released by a revoke",
                        self.name)
        except TimeoutError:
            log.warning("FUNNEL_TEST_SLOW_RECOVERY_SECONDS: %s: completion released after %.0f s",
                        self.name, self.slow_recovery)

    def recovered(self) -> None:
        raise NotImplementedError


class ErasureTable(RecoveredTable):
    """Pseudonyms of erased people; loaded into the deal processor once recovered, so an
    erasure survives restarts and rebalances (events are read only after that)."""

    def __init__(self, app: faust.App, settings: Settings, erased: set[str], **kwargs: Any) -> None:
        super().__init__(app, settings, **kwargs)
        self.erased = erased

    def recovered(self) -> None:
        self.erased |= {key.decode() for key in list(self.data.keys())}
        self.on_ready(set(), set())


class FoldedTable(RecoveredTable):
    """A table whose values feed in-memory folds of the actively owned partitions only.

    Folds are dropped when partitions are revoked (the worker's ``on_partitions_revoked``: every
    rebalance is eager) and rebuilt from the table once recovery completes, so standby replicas
    (also in this table's store) are never exported.
    """

    def __init__(
        self, app: faust.App, settings: Settings, *, folds: PartitionFolds, source_topic: str,
        contributions: Callable[[Iterable[bytes]], Iterable[tuple[int, Contribution]]],
        **kwargs: Any,
    ) -> None:
        super().__init__(app, settings, **kwargs)
        self.folds = folds
        self.source_topic = source_topic
        self.contributions = contributions

    def recovered(self) -> None:
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
