"""Alert messages on ``funnel.alerts`` (docs/design.md §5): stable ids so consumers can dedupe."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

ALERT_SCHEMA_VERSION = 1
AlertType = Literal["deal.stalled", "deal.unstalled", "conversion.drop", "conversion.recovered"]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def alert_id(*parts: object) -> str:
    """Deterministic: the same episode always gets the same id, whoever sends it, however often."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


class Alert(BaseModel):
    """One alert; ``id`` is stable per episode (deal, stage, stage entry time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = ALERT_SCHEMA_VERSION
    id: str
    type: AlertType
    pipeline: str
    stage: str
    detected_at: str
    deal_id: str | None = None
    entered_at: str | None = None
    stall_after_seconds: float | None = None
    amount: float | None = None
    currency: str | None = None
    owner: str | None = None
    next_stage: str | None = None
    window: str | None = None
    conversion: float | None = None
    baseline: float | None = None


def stall_alert(kind: Literal["deal.stalled", "deal.unstalled"], *, deal_id: str, pipeline: str,
                stage: str, entered_ms: int, now_ms: int, stall_after: float | None,
                amount: float | None, currency: str | None, owner: str | None) -> Alert:
    return Alert(
        id=alert_id(kind, deal_id, stage, entered_ms), type=kind, pipeline=pipeline, stage=stage,
        detected_at=iso(now_ms), deal_id=deal_id, entered_at=iso(entered_ms),
        stall_after_seconds=stall_after, amount=amount, currency=currency, owner=owner,
    )
