"""Debezium change events from a CRM database table → canonical events.

The envelope is ``{"before", "after", "source", "op"}``, optionally wrapped with its schema by
the JSON converter (``{"schema", "payload"}``). Which column holds what is configured
(:data:`DEFAULT_COLUMNS`, overridable per column). With the schema present, Debezium's logical
types (Decimal as base64 bytes, dates as days, micro/nano timestamps) are decoded exactly;
without it an integer timestamp is ambiguous (days? ms? µs?) and refused rather than guessed.
The columns the funnel config names as dimensions (``dimensions.<name>.sources.debezium``)
become the events' ``properties`` when they change, null when set to NULL.
"""

from __future__ import annotations

import base64
import binascii
from decimal import Decimal
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
    show,
    text,
)
from streams.crm.sources.properties import read_properties

SOURCE = "debezium"
# Canonical field (plus ``id`` and ``occurred_at``) → column name; "" switches one off.
DEFAULT_COLUMNS = {
    "id": "id",
    "stage": "stage",
    "pipeline": "pipeline",
    "amount": "amount",
    "currency": "currency",
    "owner": "owner_id",
    "account": "account_id",
    "expected_close_at": "expected_close_date",
    "deleted": "deleted",
    "occurred_at": "updated_at",
}
# Log position of a change, by connector: Postgres lsn, MySQL binlog file/pos/row, SQL Server
# change_lsn/event_serial_no, Oracle scn, MongoDB ord.
_POSITION = ("lsn", "file", "pos", "row", "change_lsn", "commit_lsn", "event_serial_no", "scn", "ord")
_DAY_MS = 86_400_000
_TIME_UNITS = {  # logical type → ms per unit (negative: divide)
    "io.debezium.time.Date": _DAY_MS,
    "org.apache.kafka.connect.data.Date": _DAY_MS,
    "io.debezium.time.Timestamp": 1,
    "org.apache.kafka.connect.data.Timestamp": 1,
    "io.debezium.time.MicroTimestamp": -1000,
    "io.debezium.time.NanoTimestamp": -1_000_000,
}


def columns_of(ctx: Context) -> dict[str, str]:
    return {**DEFAULT_COLUMNS, **ctx.debezium_columns}


def adapt(raw: bytes | Any | None, ctx: Context, key: bytes | Any | None = None) -> Adapted:
    """One Kafka record of a Debezium topic; ``key`` (the row's primary key) is a fallback id."""
    out = Adapted()
    if raw is None or raw == b"":
        out.skipped.append("tombstone")  # log compaction marker after a delete
        return out
    doc = load_json(raw, "Debezium change event")
    schema = None
    if isinstance(doc, dict) and "payload" in doc and "schema" in doc:
        schema, doc = doc["schema"], doc["payload"]
    if doc is None:
        out.skipped.append("tombstone")
        return out
    doc = as_dict(doc, "Debezium change event")
    if not isinstance(doc.get("op"), str):
        raise Malformed(
            "bad_shape",
            "not a Debezium change event envelope (op, before, after, "
            "source); do not flatten it with ExtractNewRecordState",
        )
    gather(out, _adapt_one, doc, _column_types(schema), key, ctx)
    return out


def _column_types(schema: object) -> dict[str, dict[str, Any]]:
    """Column → its Connect schema, read from the envelope schema's ``after``/``before`` struct."""
    types: dict[str, dict[str, Any]] = {}
    if not isinstance(schema, dict) or not isinstance(schema.get("fields"), list):
        return types
    for part in schema["fields"]:
        if (
            isinstance(part, dict)
            and part.get("field") in ("before", "after")
            and isinstance(part.get("fields"), list)
        ):
            for column in part["fields"]:
                if isinstance(column, dict) and isinstance(column.get("field"), str):
                    types.setdefault(column["field"], column)
    return types


def _adapt_one(doc: dict[str, Any], types: dict[str, dict[str, Any]], key: Any, ctx: Context) -> Outcome:
    op = doc["op"]
    source = as_dict(need(doc, "source", "event"), "source")
    table = ident(need(source, "table", "source"), "source.table")
    if op == "t":
        return Gap(table, "TRUNCATE", ())  # rows removed without a record of which
    if op == "m":
        return "unsupported_action"  # logical decoding message, not a row change
    if op not in ("c", "r", "u", "d"):
        raise Malformed("bad_field", f"op: unknown operation {show(op)}")
    columns = columns_of(ctx)
    before, after = doc.get("before"), doc.get("after")
    row = as_dict(before if op == "d" else after, "before" if op == "d" else "after")
    pk = _primary_key(row, columns["id"], key)
    position = ":".join(ident(source[k], f"source.{k}") for k in _POSITION if source.get(k) is not None)
    if not position:
        raise Malformed("missing_field", "source has no log position (lsn, file/pos, change_lsn, scn, ord)")
    occurred_at = from_epoch(need(source, "ts_ms", "source"), "source.ts_ms")
    if op == "r" and columns["occurred_at"] and row.get(columns["occurred_at"]) is not None:
        # A snapshot read has no change time; the row's own timestamp is the best evidence.
        occurred_at = _time(
            row[columns["occurred_at"]], types.get(columns["occurred_at"]), columns["occurred_at"]
        )
    event: dict[str, Any] = {
        "event_id": f"debezium:{table}:{pk}:{position}",
        "occurred_at": occurred_at,
        "deal_id": f"debezium:{table}:{pk}",
        "source": SOURCE,
    }
    if op == "d":
        event["deleted"] = True
        return [event]
    previous = before if op == "u" and isinstance(before, dict) else None

    def changed(name: str) -> Any:
        """The column's new value when it changed (or nothing tells), else None."""
        column = columns[name]
        if not column or row.get(column) is None:
            return None
        if previous is not None and previous.get(column) == row[column]:
            return None
        return row[column]

    if (value := changed("stage")) is not None:
        event["stage"] = text(value, columns["stage"])
    if (value := changed("pipeline")) is not None:
        event["pipeline"] = text(value, columns["pipeline"])
    if (value := changed("amount")) is not None:
        event["amount"] = amount(
            _decimal(value, types.get(columns["amount"]), columns["amount"]), columns["amount"]
        )
    if (value := changed("currency")) is not None:
        event["currency"] = currency(value, columns["currency"])
    if (value := changed("owner")) is not None:
        event["owner"] = text(value, columns["owner"])
    if (value := changed("account")) is not None:
        event["account"] = text(value, columns["account"])
    if (value := changed("expected_close_at")) is not None:
        event["expected_close_at"] = _time(
            value, types.get(columns["expected_close_at"]), columns["expected_close_at"]
        )
    if (value := changed("deleted")) is not None:
        if value not in (True, False, 0, 1) or isinstance(value, float):
            raise Malformed("bad_field", f"{columns['deleted']}: expected a boolean, got {show(value)}")
        event["deleted"] = bool(value)
    event["properties"] = _properties(row, previous, op, types, ctx)
    if not any(event.get(name) is not None for name in CHANGE_FIELDS):
        return "no_funnel_change"
    return [event]


def _properties(row: dict[str, Any], previous: dict[str, Any] | None, op: str,
                types: dict[str, dict[str, Any]], ctx: Context) -> dict[str, str | None] | None:
    """The configured dimension columns that changed. Without a before image (Postgres'
    default replica identity) an update says nothing of what changed: its values, nulls
    included, are the row as it is now. A new row's nulls say nothing."""
    dimensions = ctx.dimensions(SOURCE)
    values = {}
    for column in dimensions.values():
        if column not in row:
            continue
        value = row[column]
        if previous is not None and column in previous:
            if previous[column] == value:
                continue
        elif value is None and op != "u":
            continue
        values[column] = None if value is None else _decimal(value, types.get(column), column)
    return read_properties(dimensions, values, "")


def _primary_key(row: dict[str, Any], column: str, key: Any) -> str:
    if row.get(column) is not None:
        return ident(row[column], column)
    if key is not None:
        doc = load_json(key, "message key")
        if isinstance(doc, dict) and "payload" in doc and "schema" in doc:
            doc = doc["payload"]
        if isinstance(doc, dict) and doc.get(column) is not None:
            return ident(doc[column], f"key.{column}")
    raise Malformed("missing_field", f"no primary key: column {column!r} is in neither the row nor the key")


def _logical(schema: dict[str, Any] | None) -> str | None:
    name = schema.get("name") if isinstance(schema, dict) else None
    return name if isinstance(name, str) else None


def _decimal(value: Any, schema: dict[str, Any] | None, column: str) -> Any:
    """Connect Decimal (base64 two's-complement bytes + scale) → number; others pass through."""
    name = _logical(schema)
    if name == "io.debezium.data.VariableScaleDecimal" and isinstance(value, dict):
        scale, value = value.get("scale"), value.get("value")
    elif name == "org.apache.kafka.connect.data.Decimal":
        params = schema.get("parameters") if isinstance(schema, dict) else None
        scale = params.get("scale") if isinstance(params, dict) else None
    else:
        return value
    try:
        digits = base64.b64decode(value, validate=True)  # type: ignore[arg-type]
        scale = int(scale)  # type: ignore[arg-type]
    except (binascii.Error, TypeError, ValueError):
        raise Malformed("bad_amount", f"{column}: not a base64 Connect Decimal: {show(value)}") from None
    if len(digits) > 32 or not 0 <= scale <= 64:
        raise Malformed("bad_amount", f"{column}: Decimal out of range")
    return float(Decimal(int.from_bytes(digits, "big", signed=True)).scaleb(-scale))


def _time(value: Any, schema: dict[str, Any] | None, column: str) -> str:
    unit = _TIME_UNITS.get(_logical(schema) or "")
    if isinstance(value, str):
        return from_iso(value, column, naive_utc=True)  # Debezium renders times in UTC
    if unit is None:
        raise Malformed(
            "bad_timestamp",
            f"{column}: an integer time needs the schema to say its unit "
            "(enable value.converter.schemas.enable)",
        )
    if type(value) is not int:
        raise Malformed("bad_timestamp", f"{column}: expected an integer time, got {show(value)}")
    return from_epoch(value // -unit, column) if unit < 0 else from_epoch(value, column, unit_ms=unit)
