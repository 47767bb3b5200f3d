"""Stalled deals: which open deals of a partition crossed their stage's stall threshold, and
the alerts of a stall and of its end."""

from __future__ import annotations

import heapq
from typing import Literal

from models.aggregates import open_stay
from models.alerts import Alert, stall_alert
from models.config import FunnelConfig
from models.deal import Deal
from models.fold import ALERTED_BYTE, OPEN_DEAL, Fold, stalled_before


def crossed_stalls(fold: Fold, config: FunnelConfig, now: int,
                   cap: int) -> list[tuple[int, str, str, str, float]]:
    """``(entered, deal id, pipeline, stage, stall_after)`` of each deal that sat in its open
    stage longer than the stage's ``stall_after`` and was not alerted for that stay yet, the
    longest stalled first, at most ``cap`` (the open-deals index of the fold: no table scan)."""
    crossed = []
    for (pl, stage, _, _), group in fold.open_deals.items():
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


def deal_stall_alert(kind: Literal["deal.stalled", "deal.unstalled"], deal: Deal,
                     config: FunnelConfig, stage: str, entered: int, now: int) -> Alert:
    pl = deal.value("pipeline") or "default"
    stage_config = config.pipelines[pl].by_name.get(stage)  # type: ignore[index]
    return stall_alert(
        kind, deal_id=deal.deal_id, pipeline=pl, stage=stage, entered_ms=entered, now_ms=now,  # type: ignore[arg-type]
        stall_after=stage_config.stall_after if stage_config else None,
        amount=deal.value("amount"),  # type: ignore[arg-type]
        currency=deal.value("currency") or config.default_currency,  # type: ignore[arg-type]
        owner=deal.owner,
    )


def unstall(deal: Deal, config: FunnelConfig, now: int) -> Alert | None:
    """The ``deal.unstalled`` alert of a deal alerted as stalled whose stay has ended (the deal
    forgets the stall), else None."""
    if deal.stall_alert is None or open_stay(deal, config) == deal.stall_alert:
        return None
    stage, entered = deal.stall_alert
    deal.stall_alert = None
    return deal_stall_alert("deal.unstalled", deal, config, stage, entered, now)
