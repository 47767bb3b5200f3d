"""Salesforce Change Data Capture (OpportunityChangeEvent, LeadChangeEvent) → canonical events.

Accepts the change event itself (``{"ChangeEventHeader": …, <fields>}``) or wrapped as the
streaming API delivers it (``{"data": {"payload": …, "event": {"replayId": …}}}``). One event
can name several records (same change, same transaction): it fans out to one canonical event per
record. On UPDATE only changed fields are non-null; a null means "unchanged" unless the field is
in ``nulledFields``, and a cleared value has no canonical form, so it is left out, except for
the fields the funnel config names as dimensions (``dimensions.<name>.sources.salesforce``, an
API name such as ``Region__c``): they become the event's ``properties``, null when cleared; so
does ``ForecastCategoryName``, always (``properties.forecast_category``). Gap
events say changes happened without describing them: they are reported, never guessed.
"""

from __future__ import annotations

import re
from typing import Any

from models.event import CHANGE_FIELDS
from streams.crm.sources.common import (
    Adapted,
    Context,
    Gap,
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
    text,
)
from streams.crm.sources.properties import read_properties

SOURCE = "salesforce"
_RECORD_ID = re.compile(r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?")
_CHANGES = {"CREATE", "UPDATE", "DELETE", "UNDELETE"}
_GAPS = {"GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW"}


def parse(raw: bytes | Any) -> dict[str, Any]:
    """The change event, unwrapped from a streaming-API message if need be."""
    doc = as_dict(load_json(raw, "Salesforce change event"), "Salesforce change event")
    if isinstance(doc.get("data"), dict):
        doc = doc["data"]
    if isinstance(doc.get("payload"), dict):
        doc = doc["payload"]
    as_dict(doc.get("ChangeEventHeader"), "ChangeEventHeader")
    return doc


def adapt(raw: bytes | Any, ctx: Context) -> Adapted:
    out = Adapted()
    doc = parse(raw)
    header = doc["ChangeEventHeader"]
    entity = header.get("entityName")
    change = header.get("changeType")
    if not (isinstance(entity, str) and isinstance(change, str)):
        out.rejects.append(Malformed("missing_field", "ChangeEventHeader needs entityName and changeType"))
        return out
    if change in _GAPS:
        ids = header.get("recordIds")
        out.gaps.append(
            Gap(
                _entity_label(entity),
                change,
                tuple(value for value in (ids if isinstance(ids, list) else []) if isinstance(value, str)),
            )
        )
        return out
    if entity not in ("Opportunity", "Lead"):
        out.skipped.append("unsupported_object")
        return out
    if change not in _CHANGES:
        out.rejects.append(Malformed("bad_field", "ChangeEventHeader.changeType is not a known change type"))
        return out
    ids = header.get("recordIds")
    if not isinstance(ids, list) or not ids:
        out.rejects.append(Malformed("missing_field", "ChangeEventHeader.recordIds is missing or empty"))
        return out
    for i, record_id in enumerate(ids):
        gather(out, _adapt_one, doc, header, entity, change, record_id, f"recordIds[{i}]", ctx)
    return out


def _entity_label(entity: str) -> str:
    return entity if entity in ("Opportunity", "Lead") else "other"


def _adapt_one(
    doc: dict[str, Any],
    header: dict[str, Any],
    entity: str,
    change: str,
    record_id: object,
    where: str,
    ctx: Context,
) -> Outcome:
    if isinstance(record_id, str) and "*" in record_id:
        # A wildcard id ("006*") stands for records the event does not list: a gap, in effect.
        return Gap(entity, change, (record_id,))
    if not (isinstance(record_id, str) and _RECORD_ID.fullmatch(record_id)):
        raise Malformed("bad_id", f"{where}: not a Salesforce record id")
    transaction = ident(need(header, "transactionKey", "ChangeEventHeader"), "transactionKey")
    sequence = ident(need(header, "sequenceNumber", "ChangeEventHeader"), "sequenceNumber")
    event: dict[str, Any] = {
        # Unique per change and record, identical on redelivery and replay from any channel.
        "event_id": f"salesforce:{transaction}:{sequence}:{record_id}",
        "occurred_at": from_epoch(need(header, "commitTimestamp", "ChangeEventHeader"), "commitTimestamp"),
        "deal_id": f"salesforce:{record_id}",
        "source": SOURCE,
    }
    if change == "DELETE":
        event["deleted"] = True
        return [event]
    if change == "UNDELETE":
        event["deleted"] = False
    stage_field = "StageName" if entity == "Opportunity" else "Status"
    stage = doc.get(stage_field)
    if stage is not None:
        event["stage"] = text(stage, stage_field)
    if entity == "Lead":
        event["pipeline"] = ctx.lead_pipeline
    elif stage is not None:
        event["pipeline"] = ctx.pipeline_of(SOURCE, event["stage"])
    if doc.get("OwnerId") is not None:
        event["owner"] = f"salesforce:{ident(doc['OwnerId'], 'OwnerId')}"
    if entity == "Opportunity":
        if doc.get("Amount") is not None:
            event["amount"] = amount(doc["Amount"], "Amount")
        if doc.get("CurrencyIsoCode") is not None:
            event["currency"] = currency(doc["CurrencyIsoCode"], "CurrencyIsoCode")
        if doc.get("AccountId") is not None:
            event["account"] = f"salesforce:{ident(doc['AccountId'], 'AccountId')}"
        close = doc.get("CloseDate")
        if close is not None:
            # Pub/Sub API (Avro) sends epoch ms, the streaming API's JSON a date.
            event["expected_close_at"] = (
                from_epoch(close, "CloseDate") if isinstance(close, int) else from_iso(close, "CloseDate")
            )
    event["properties"] = _properties(doc, header, change, ctx)
    if not any(event.get(name) is not None for name in CHANGE_FIELDS):
        return "no_funnel_change"
    return [event]


def _properties(doc: dict[str, Any], header: dict[str, Any], change: str,
                ctx: Context) -> dict[str, str | None] | None:
    """The configured dimension fields and the forecast category the change carries: non-null
    values, and on UPDATE the fields ``nulledFields`` says were cleared (null)."""
    dimensions = ctx.dimensions(SOURCE)
    if not dimensions:
        return None
    nulled = header.get("nulledFields") if change == "UPDATE" else None
    cleared = {name for name in nulled if isinstance(name, str)} if isinstance(nulled, list) else set()
    values = {field: doc.get(field) for field in dimensions.values()
              if doc.get(field) is not None or field in cleared}
    return read_properties(dimensions, values, "")
