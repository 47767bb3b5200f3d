"""Which open deals of a partition crossed their stage's stall threshold."""

from __future__ import annotations

import heapq

from models.aggregates import ALERTED_BYTE, OPEN_DEAL, Fold, stalled_before
from models.config import FunnelConfig


def crossed_stalls(fold: Fold, config: FunnelConfig, now: int,
                   cap: int) -> list[tuple[int, str, str, str, float]]:
    """``(entered, deal id, pipeline, stage, stall_after)`` of each deal that sat in its open
    stage longer than the stage's ``stall_after`` and was not alerted for that stay yet, the
    longest stalled first, at most ``cap`` (the open-deals index of the fold: no table scan)."""
    crossed = []
    for (pl, stage, _), group in fold.open_deals.items():
        stall_after = config.pipelines[pl].by_name[stage].stall_after
        if stall_after is None:
            continue
        before = stalled_before(now, stall_after)
        for deal_id, packed in group.items():
            if packed[ALERTED_BYTE]:  # raised already (most stalled deals): skip unpacking
                continue
            entered = OPEN_DEAL.unpack(packed)[0]
            if entered < before:
                crossed.append((entered, deal_id, pl, stage, stall_after))
    return heapq.nsmallest(cap, crossed) if len(crossed) > cap else crossed
