"""Pub/Sub API change events → the JSON ``crm.raw.salesforce`` holds (what ``funnel-kpi adapt`` reads).

A ``ConsumerEvent`` carries an Avro payload (binary, no container) and the id of the schema it
was written with; the schema comes from ``GetSchema`` once per id and is cached. The decoded
event is the change event itself (``ChangeEventHeader`` + fields, nulls for fields an UPDATE did
not change); its header bitmaps become field names (:mod:`streams.crm.pubsub.bitmap`), so the
record reads like the streaming API's JSON, wrapped in its envelope
``{"channel", "data": {"schema", "payload", "event": {"replayId", "EventUuid"}}}`` (the replay id
as hex: Pub/Sub replay ids are opaque bytes). The adapter unwraps it and keys events by
``transactionKey``, ``sequenceNumber`` and the record id, the ids every delivery and replay of
the change share.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import fastavro
import orjson

from streams.crm.pubsub.bitmap import BitmapError, field_names

BITMAP_FIELDS = ("changedFields", "nulledFields", "diffFields")


class Undecodable(ValueError):
    """A payload that does not decode with its schema, or a header that does not fit it."""


@dataclass(frozen=True)
class Schema:
    schema_id: str
    document: dict[str, Any]  # the Avro schema as JSON
    parsed: Any  # fastavro's parsed form

    @classmethod
    def from_json(cls, schema_id: str, text: str) -> Schema:
        document = json.loads(text)
        return cls(schema_id, document, fastavro.parse_schema(document))

    def decode(self, payload: bytes) -> dict[str, Any]:
        try:
            return fastavro.schemaless_reader(io.BytesIO(payload), self.parsed)
        except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
            raise Undecodable(f"payload does not decode with schema {self.schema_id}: {exc}") from None


class SchemaCache:
    """Schemas by id, fetched once (``fetch(schema_id)`` returns the schema JSON text)."""

    def __init__(self, fetch: Callable[[str], Awaitable[str]]) -> None:
        self.fetch = fetch
        self.schemas: dict[str, Schema] = {}
        self.fetched = 0

    async def get(self, schema_id: str) -> Schema:
        schema = self.schemas.get(schema_id)
        if schema is None:
            schema = Schema.from_json(schema_id, await self.fetch(schema_id))
            self.fetched += 1
            self.schemas[schema_id] = schema
        return schema


def change_event(schema: Schema, payload: bytes) -> dict[str, Any]:
    """The decoded change event with its header bitmaps as field names."""
    event = schema.decode(payload)
    header = event.get("ChangeEventHeader")
    if not isinstance(header, dict):
        raise Undecodable(f"schema {schema.schema_id} is not a change event schema (no ChangeEventHeader)")
    header = dict(header)
    try:
        for name in BITMAP_FIELDS:
            header[name] = field_names(schema.document, header.get(name) or [])
    except BitmapError as exc:
        raise Undecodable(f"ChangeEventHeader bitmap: {exc}") from None
    return {**event, "ChangeEventHeader": header}


def raw_message(
    channel: str, schema_id: str, replay_id: bytes, event_uuid: str, event: dict[str, Any]
) -> dict[str, Any]:
    """The record written to the raw topic: the streaming API's envelope around the event."""
    return {
        "channel": channel,
        "data": {
            "schema": schema_id,
            "payload": event,
            "event": {"replayId": replay_id.hex(), "EventUuid": event_uuid},
        },
    }


def encode(message: dict[str, Any]) -> bytes:
    return orjson.dumps(message, default=_bytes)


def message_key(event: dict[str, Any], channel: str) -> bytes:
    """The first record id (a record's changes stay on one partition), else the channel."""
    ids = event["ChangeEventHeader"].get("recordIds") or []
    return str(ids[0] if ids else channel).encode()


def _bytes(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
