"""Deal properties as events carry them (the configured dimensions and the CRM's own forecast
category, :meth:`Context.dimensions`): read from a CRM payload's fields as text."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from models.event import MAX_TEXT
from streams.crm.sources.common import Malformed, show


def property_text(value: object, where: str) -> str | None:
    """A dimension's value as events carry it (None: cleared): the CRM's value as text, numbers
    and booleans (and option ids) in their plain form, a multi-option field's options joined by
    commas. The workers fold case and blanks, so nothing else is changed here; a value longer
    than an event may carry is refused rather than cut (a cut value would be another value)."""
    if isinstance(value, dict):  # Pipedrive: {"value": …, "currency"|"name": …}
        key = "value" if "value" in value else "id"
        if key not in value or isinstance(value[key], dict):
            raise Malformed("bad_property", f"{where}: expected a value, got {show(value)}")
        value = value[key]
    if isinstance(value, list):  # a multi-option field: its options
        if any(isinstance(part, dict | list) for part in value):
            raise Malformed("bad_property", f"{where}: expected a list of values, got nested ones")
        value = ",".join(part for option in value
                         if (part := property_text(option, f"{where}[]")) is not None) or None
    if value is None or isinstance(value, str):
        found = value
    elif isinstance(value, bool):
        found = "true" if value else "false"
    elif type(value) is int:
        if value.bit_length() > 1800:  # 500+ digits: too long anyway (str() refuses 4300+)
            raise Malformed("bad_property", f"{where}: a huge integer is not a property value")
        found = str(value)
    elif type(value) is float and math.isfinite(value):
        found = str(int(value)) if value.is_integer() else repr(value)
    else:
        raise Malformed("bad_property", f"{where}: expected text, a number or a boolean, got {show(value)}")
    if found is not None and len(found) > MAX_TEXT:
        raise Malformed("bad_property", f"{where}: {show(found)} is longer than the {MAX_TEXT} "
                                        "characters a property value may have")
    return found


def read_properties(dimensions: Mapping[str, str], values: Mapping[str, Any],
                    where: str) -> dict[str, str | None] | None:
    """The ``properties`` of an event: each dimension whose field is in ``values`` (the fields
    a change carries, None for a cleared one), read with :func:`property_text`; None if none."""
    found = {name: property_text(values[field], f"{where}{field}")
             for name, field in dimensions.items() if field in values}
    return found or None
