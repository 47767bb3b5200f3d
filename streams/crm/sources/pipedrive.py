"""Pipedrive webhooks (v2, and v1 which is still around) → canonical events.

v2: ``{"meta", "data", "previous"}`` where ``data`` is the deal now and ``previous`` holds only
the fields that changed, so an event carries exactly what changed. v1: ``{"meta", "current",
"previous"}`` with whole objects, diffed here. A deal's funnel position is its ``stage_id`` while
open and its ``status`` once won or lost (Pipedrive keeps the last stage id on closed deals), so
won/lost become the canonical ``won``/``lost`` stages. The deal fields the funnel config names
as dimensions (``dimensions.<name>.sources.pipedrive``: a field key, custom fields by their
40-character hash key, found under ``custom_fields`` in v2) become the events' ``properties``;
enum and set fields carry option ids, passed on as text (a set's ids joined by commas).
"""

from __future__ import annotations

from typing import Any

from streams.crm.sources.common import (
    Adapted,
    Context,
    Malformed,
    Outcome,
    amount,
    as_dict,
    currency,
    from_epoch,
    from_iso,
    gather,
    ident,
    load_json,
    need,
    show,
)
from streams.crm.sources.properties import read_properties

SOURCE = "pipedrive"
_V1_ACTIONS = {"added": "create", "updated": "change", "deleted": "delete"}
_CLOSED = {"won": "won", "lost": "lost"}
_USED = (
    "status",
    "is_deleted",
    "stage_id",
    "value",
    "currency",
    "owner_id",
    "user_id",
    "org_id",
    "expected_close_date",
)


def parse(raw: bytes | Any) -> dict[str, Any]:
    """The envelope check done at the HTTP edge: a JSON object with a ``meta`` object."""
    doc = as_dict(load_json(raw, "Pipedrive webhook body"), "Pipedrive webhook body")
    as_dict(doc.get("meta"), "meta")
    return doc


def adapt(raw: bytes | Any, ctx: Context) -> Adapted:
    out = Adapted()
    gather(out, _adapt_one, parse(raw), ctx)
    return out


def _adapt_one(doc: dict[str, Any], ctx: Context) -> Outcome:
    meta = doc["meta"]
    if "current" in doc or doc.get("v") == 1 or meta.get("v") == 1:
        return _v1(doc, meta, ctx)
    entity = meta.get("entity")
    if entity != "deal":
        return "unsupported_object"
    action = meta.get("action")
    data, previous = doc.get("data"), doc.get("previous")
    last = data if isinstance(data, dict) else previous if isinstance(previous, dict) else {}
    deal_id = ident(meta.get("entity_id") or last.get("id"), "meta.entity_id")
    event_id = f"pipedrive:{ident(need(meta, 'id', 'meta'), 'meta.id')}"
    occurred_at = _timestamp(need(meta, "timestamp", "meta"))
    if action == "delete":
        return [_event(event_id, occurred_at, deal_id, deleted=True)]
    if action not in ("create", "change"):
        return "unsupported_action"
    data = as_dict(data, "data")
    changed = None
    if action == "change":
        previous = as_dict(previous, "previous")
        custom = previous.get("custom_fields")
        changed = set(previous) | (set(custom) if isinstance(custom, dict) else set())
    return _changes(event_id, occurred_at, deal_id, data, previous, changed, ctx)


def _v1(doc: dict[str, Any], meta: dict[str, Any], ctx: Context) -> Outcome:
    if meta.get("object") != "deal":
        return "unsupported_object"
    action = meta.get("action")
    action = _V1_ACTIONS.get(action) if isinstance(action, str) else None
    if action is None:
        return "unsupported_action"  # "merged": which deal survives is not guessed
    deal_id = ident(need(meta, "id", "meta"), "meta.id")
    micros = meta.get("timestamp_micro")
    if type(micros) is int and micros >= 0:
        occurred_at = from_epoch(micros // 1000, "meta.timestamp_micro")
        stamp = str(micros)
    else:
        occurred_at = _timestamp(need(meta, "timestamp", "meta"))
        stamp = occurred_at
    event_id = f"pipedrive:v1:{action}:{deal_id}:{stamp}"
    if action == "delete":
        return [_event(event_id, occurred_at, deal_id, deleted=True)]
    data = as_dict(doc.get("current"), "current")
    previous = doc.get("previous")
    changed = None
    if action == "change":
        previous = as_dict(previous, "previous")
        changed = {k for k in _USED if data.get(k) != previous.get(k)} | {
            key for key in ctx.dimensions(SOURCE).values() if field(data, key) != field(previous, key)}
    return _changes(event_id, occurred_at, deal_id, data, previous, changed, ctx)


def _changes(
    event_id: str,
    occurred_at: str,
    deal_id: str,
    data: dict[str, Any],
    previous: Any,
    changed: set[str] | None,
    ctx: Context,
) -> Outcome:
    """The canonical fields of what changed (everything when ``changed`` is None: a create)."""

    def touched(*keys: str) -> bool:
        return changed is None or any(key in changed for key in keys)

    status = data.get("status")
    if status is not None and not isinstance(status, str):
        raise Malformed("bad_field", f"data.status: expected text, got {show(status)}")
    deleted = data.get("is_deleted") is True or status == "deleted"
    fields: dict[str, Any] = {}
    was_deleted = isinstance(previous, dict) and (
        previous.get("is_deleted") is True or previous.get("status") == "deleted"
    )
    if deleted or (changed is not None and was_deleted and touched("status", "is_deleted")):
        fields["deleted"] = deleted
    stage_id = data.get("stage_id")
    if stage_id is not None:
        stage_id = ident(stage_id, "data.stage_id")
    if not deleted and touched("status", "stage_id", "is_deleted"):
        if status in _CLOSED:
            fields["stage"] = _CLOSED[status]
        elif status in ("open", None) and stage_id is not None:
            fields["stage"] = stage_id
        elif status not in ("open", None):
            raise Malformed("bad_field", f"data.status: unknown deal status {show(status)}")
    if touched("value") and data.get("value") is not None:
        fields["amount"] = amount(data["value"], "data.value")
    if touched("currency") and data.get("currency") is not None:
        fields["currency"] = currency(data["currency"], "data.currency")
    owner_key = "owner_id" if "owner_id" in data else "user_id"
    if touched(owner_key) and data.get(owner_key) is not None:
        fields["owner"] = f"pipedrive:user:{_ref(data[owner_key], f'data.{owner_key}')}"
    if touched("org_id") and data.get("org_id") is not None:
        fields["account"] = f"pipedrive:org:{_ref(data['org_id'], 'data.org_id')}"
    if touched("expected_close_date") and data.get("expected_close_date") is not None:
        fields["expected_close_at"] = from_iso(
            data["expected_close_date"], "data.expected_close_date", naive_utc=True
        )
    dimensions = ctx.dimensions(SOURCE)
    values = {key: field(data, key) for key in dimensions.values() if touched(key)}
    if changed is None:  # a new deal: its fields without a value say nothing
        values = {key: value for key, value in values.items() if value is not None}
    properties = read_properties(dimensions, values, "data.")
    if properties:
        fields["properties"] = properties
    if not fields:
        return "no_funnel_change"
    pipeline = None if stage_id is None else ctx.pipeline_of(SOURCE, stage_id)
    return [_event(event_id, occurred_at, deal_id, pipeline=pipeline, **fields)]


def _event(event_id: str, occurred_at: str, deal_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "occurred_at": occurred_at,
        "deal_id": f"pipedrive:deal:{deal_id}",
        "source": SOURCE,
        **fields,
    }


def field(deal: dict[str, Any], key: str) -> Any:
    """A deal field by its key: top level (standard fields; v1's custom fields) or, in v2,
    under ``custom_fields`` (custom fields, by their 40-character hash key)."""
    if key in deal:
        return deal[key]
    custom = deal.get("custom_fields")
    return custom.get(key) if isinstance(custom, dict) else None


def _ref(value: object, where: str) -> str:
    """A related object's id: a plain id, or v1's expanded ``{"value"|"id": …, "name": …}``."""
    if isinstance(value, dict):
        value = value.get("value", value.get("id"))
    return ident(value, where)


def _timestamp(value: object) -> str:
    """``meta.timestamp``: epoch seconds (number or digits) or ISO text, both seen in the wild."""
    if isinstance(value, str) and not value.isdigit():
        return from_iso(value, "meta.timestamp", naive_utc=True)
    return from_epoch(value, "meta.timestamp", unit_ms=1000)
