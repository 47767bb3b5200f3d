"""What the CRM readers share: a page of results, a CRM stage, owner names, time helpers,
``--since``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.crm.sources.common import Adapted, Context, Malformed, from_iso, ident


@dataclass
class Page:
    """One page of deals turned into events; ``cursor`` resumes after it (None: the last)."""

    deals: int
    events: list[dict[str, Any]]
    cursor: str | None
    skipped: Counter = field(default_factory=Counter)
    rejects: list[Malformed] = field(default_factory=list)

    def add(self, adapted: Adapted) -> None:
        self.events += adapted.events
        self.skipped.update(adapted.skipped)
        self.rejects += adapted.rejects


def owner_names(records: list[Any], prefix: str, id_field: str, where: str,
                name_of: Callable[[dict[str, Any]], str]) -> dict[str, str]:
    """CRM users → owner id as the live events carry it (``prefix`` + id) → display name, for
    ``--print-stage-map``; a record without a readable id or a name is left out (the board then
    shows the id)."""
    owners = {}
    for record in records:
        if not isinstance(record, dict):
            continue
        name = name_of(record).strip()
        try:
            owner_id = ident(record.get(id_field), where)
        except Malformed:
            continue
        if name:
            owners[f"{prefix}{owner_id}"] = name
    return owners


@dataclass(frozen=True)
class CrmStage:
    """A stage as the CRM defines it, for ``--print-stage-map``."""

    pipeline_id: str
    pipeline_label: str
    stage_id: str
    label: str
    probability: float | None  # 0..1
    closed: bool = False
    won: bool = False


def epoch_ms(value: object, where: str, *, naive_utc: bool = False) -> int:
    """An ISO 8601 timestamp as epoch ms (the webhook payloads' unit)."""
    text = from_iso(value, where, naive_utc=naive_utc)
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def adapt_all(adapt: Callable[[Any, Context], Adapted], payloads: list[Any], ctx: Context) -> Adapted:
    """Run payloads in the live format through the live adapter, one result for all."""
    out = Adapted()
    for payload in payloads:
        part = adapt(payload, ctx)
        out.events += part.events
        out.skipped += part.skipped
        out.rejects += part.rejects
    return out


def resume(cursor: str | None, passes: tuple[str, ...]) -> Iterator[tuple[str, str | None, str | None]]:
    """The paging passes (current deals, then deleted ones) from a checkpoint cursor
    ``<pass>:<after>``: (pass, where in it to start, the cursor that starts the next pass, None
    after the last)."""
    done, _, after = (cursor or f"{passes[0]}:").partition(":")
    start = passes.index(done)
    for i, kind in enumerate(passes[start:], start):
        yield kind, after or None, f"{passes[i + 1]}:" if i + 1 < len(passes) else None
        after = ""


def limit_history(events: list[dict[str, Any]], since: str) -> list[dict[str, Any]]:
    """``--since``: each deal's changes from ``since`` on, plus the last value of every field
    and property before it (so every deal still ends in its true state; older history is left
    out)."""
    kept: list[dict[str, Any]] = []
    before: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:
        if event["occurred_at"] >= since:
            kept.append(event)
            continue
        names = [name for name in _FIELDS if name in event]
        names += [f"properties.{name}" for name in event.get("properties") or ()]
        for name in names:
            key = (event["deal_id"], name)
            if key not in before or (before[key]["occurred_at"], before[key]["event_id"]) < (
                event["occurred_at"], event["event_id"]):
                before[key] = event
    latest = {id(event): event for event in before.values()}
    return [*latest.values(), *kept]


_FIELDS = ("stage", "amount", "currency", "owner", "account", "expected_close_at", "deleted")
