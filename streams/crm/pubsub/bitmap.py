"""ChangeEventHeader bitmaps (``changedFields``, ``nulledFields``, ``diffFields``) → field names.

The Pub/Sub API sends these lists as bitmaps over the fields of the event's Avro schema, as
Salesforce documents ("Event Deserialization Considerations"; the official Python example's
``ChangeEventHeaderUtility``):

* ``"0x<hex>"``: bit *i* of the hex number (bit 0 the least significant) set means the schema's
  top-level field *i* (``ChangeEventHeader`` is field 0);
* ``"<n>-0x<hex>"``: a compound field (``Name``, ``Address`` …): top-level field *n* is a record,
  bit *i* names its nested field *i*, written ``Parent.Child``.

Pure functions of the schema (as parsed JSON) and the list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class BitmapError(ValueError):
    """A bitmap that does not fit the schema (a bit past the last field, not hex, not a record)."""


def field_names(schema: dict[str, Any], bitmaps: Iterable[str]) -> list[str]:
    """The field names ``bitmaps`` stand for, top-level fields first, in the order given."""
    fields = schema["fields"]
    records = _named_records(schema)
    names: list[str] = []
    for item in bitmaps:
        if not isinstance(item, str):
            raise BitmapError(f"not a bitmap: {item!r:.40}")
        if item.startswith("0x"):
            names += [fields[i]["name"] for i in _bits(item, len(fields))]
            continue
        position, dash, bits = item.partition("-")
        if not (dash and position.isdigit() and bits.startswith("0x")):
            raise BitmapError(f"not a bitmap: {item!r:.40}")
        index = int(position)
        if index >= len(fields):
            raise BitmapError(f"{item!r:.40}: the schema has {len(fields)} fields")
        parent = fields[index]
        child = _record(parent["type"], records)
        if child is None:
            raise BitmapError(f"{item!r:.40}: field {parent['name']} is not a compound field")
        names += [f"{parent['name']}.{child['fields'][i]['name']}" for i in _bits(bits, len(child["fields"]))]
    return names


def bitmap_of(fields: list[str], names: Iterable[str]) -> str:
    """The inverse for top-level fields (used to publish test events): names → ``0x<hex>``."""
    value = 0
    for name in names:
        value |= 1 << fields.index(name)
    return hex(value)


def _bits(text: str, size: int) -> list[int]:
    try:
        value = int(text[2:], 16)
    except ValueError:
        raise BitmapError(f"not a hex bitmap: {text!r:.40}") from None
    if value >> size:
        raise BitmapError(f"{text!r:.40} sets a bit past the {size} fields of the schema")
    return [i for i in range(value.bit_length()) if value >> i & 1]


def _named_records(schema: Any, found: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Every record type defined in the schema, by name and full name (types may be reused by name)."""
    found = {} if found is None else found
    if isinstance(schema, list):
        for member in schema:
            _named_records(member, found)
    elif isinstance(schema, dict):
        if schema.get("type") == "record":
            name = schema["name"]
            found[name] = schema
            if schema.get("namespace"):
                found[f"{schema['namespace']}.{name}"] = schema
            for field in schema.get("fields", ()):
                _named_records(field["type"], found)
        elif schema.get("type") in ("array", "map"):
            _named_records(schema.get("items") or schema.get("values"), found)
    return found


def _record(kind: Any, records: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The record type of a field: itself, its union member (``["null", Record]``), or by name."""
    if isinstance(kind, list):
        for member in kind:
            found = _record(member, records)
            if found is not None:
                return found
        return None
    if isinstance(kind, str):
        return records.get(kind)
    if isinstance(kind, dict) and kind.get("type") == "record":
        return kind
    return None
