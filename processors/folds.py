"""Aggregates per owned partition."""

from __future__ import annotations

from collections.abc import Iterable

from models.aggregates import Contribution
from models.fold import Fold


class PartitionFolds:
    """Aggregates of the partitions this worker actively owns, and nothing else.

    From a revocation until the rebuild after the next assignment nothing is owned: a batch
    still in flight then updates a throw-away fold, never one that /metrics exports (the new
    owner may already export that partition)."""

    def __init__(self) -> None:
        self.folds: dict[int, Fold] = {}
        self.owned: set[int] | None = None  # None: not managed by a worker (tools, unit tests)

    def fold(self, partition: int) -> Fold:
        fold = self.folds.get(partition)
        if fold is None:
            fold = Fold()
            if self.owned is None or partition in self.owned:
                self.folds[partition] = fold
        return fold

    def rebuild(self, active: set[int], items: Iterable[tuple[int, Contribution]]) -> None:
        """Recompute from the table: ``items`` are (partition, contribution) of stored values."""
        folds = {partition: Fold() for partition in active}
        for partition, contribution in items:
            fold = folds.get(partition)
            if fold is not None:
                fold.apply(contribution, 1)
        self.folds = folds
        self.owned = set(active)

    def rebuild_partition(self, partition: int, contributions: Iterable[Contribution]) -> None:
        """Recompute one owned partition from its stored values (after a failed batch)."""
        if self.owned is None or partition in self.owned:
            self.folds[partition] = Fold.of(contributions)

    def revoke_all(self) -> None:
        self.folds = {}
        self.owned = set()

    def total(self) -> Fold:
        total = Fold()
        for fold in list(self.folds.values()):
            total.merge(fold)
        return total
