"""HubSpot webhooks (Webhooks API): signatures and the adapter to canonical events.

A POST carries a JSON array of events, each about one object and at most one property
(``propertyValue`` is always text). Deals become ``hubspot:deal:<id>``; contacts' lifecycle
stage is a funnel of its own (``hubspot:contact:<id>`` in the lifecycle pipeline). Delivery is
at least once and unordered, so the event id is HubSpot's own (retries resend it) and the event
time is ``occurredAt``; the deal agent does the rest. A property the funnel config names as a
dimension (``dimensions.<name>.sources.hubspot``) becomes the event's ``properties``, null when
cleared; a property that is both (``amount``, say) sets both. ``hs_forecast_category`` is read the
same way, always: ``properties.forecast_category``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
    text,
)
from streams.crm.sources.properties import read_properties

SOURCE = "hubspot"
SIGNATURE_MAX_AGE_MS = 5 * 60 * 1000  # HubSpot: reject v3 requests older than 5 minutes
# Generic ``object.*`` subscriptions name the object type by id (0-1 contact, 0-3 deal).
_OBJECT_TYPES = {"0-1": "contact", "0-3": "deal"}
_EXISTS = {"creation": False, "restore": False, "deletion": True, "privacyDeletion": True}
# HubSpot percent-decodes these characters of the URI before signing (v3 docs).
_URI_DECODE = {
    "%3A": ":",
    "%2F": "/",
    "%3F": "?",
    "%40": "@",
    "%21": "!",
    "%24": "$",
    "%27": "'",
    "%28": "(",
    "%29": ")",
    "%2A": "*",
    "%2C": ",",
    "%3B": ";",
}


def signature_v1(secret: str, body: bytes) -> str:
    return hashlib.sha256(secret.encode() + body).hexdigest()


def signature_v2(secret: str, method: str, uri: str, body: bytes) -> str:
    return hashlib.sha256(secret.encode() + method.encode() + uri.encode() + body).hexdigest()


def signature_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    message = method.encode() + _decode_uri(uri).encode() + body + timestamp.encode()
    return base64.b64encode(hmac.new(secret.encode(), message, hashlib.sha256).digest()).decode()


def _decode_uri(uri: str) -> str:
    for encoded, char in _URI_DECODE.items():
        uri = uri.replace(encoded, char).replace(encoded.lower(), char)
    return uri


def verify(
    secret: str,
    versions: frozenset[str],
    headers: Any,
    method: str,
    uri: str,
    body: bytes,
    now_ms: int,
) -> str:
    """Check a request's signature; returns the version used, raises ``PermissionError``.

    v3 (HMAC with a timestamp, refused outside a 5-minute window) is preferred; v1/v2 carry no
    timestamp, so a captured request replays forever: accept them only where configured.
    """
    v3 = headers.get("X-HubSpot-Signature-v3")
    if v3 is not None and "v3" in versions:
        timestamp = headers.get("X-HubSpot-Request-Timestamp", "")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 15):
            raise PermissionError("missing or unreadable X-HubSpot-Request-Timestamp")
        if abs(now_ms - int(timestamp)) > SIGNATURE_MAX_AGE_MS:
            raise PermissionError("request timestamp outside the 5-minute window")
        _same(signature_v3(secret, method, uri, body, timestamp), v3)
        return "v3"
    legacy = headers.get("X-HubSpot-Signature")
    version = headers.get("X-HubSpot-Signature-Version", "").lower()
    if legacy is not None and version in versions & {"v1", "v2"}:
        expected = signature_v1(secret, body) if version == "v1" else signature_v2(secret, method, uri, body)
        _same(expected, legacy)
        return version
    raise PermissionError(f"no signature of an accepted version ({', '.join(sorted(versions))})")


def _same(expected: str, given: str) -> None:
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "surrogateescape")):
        raise PermissionError("signature does not match")


def parse(raw: bytes | Any) -> list[Any]:
    """The envelope check done at the HTTP edge: a JSON array (of events)."""
    doc = load_json(raw, "HubSpot webhook body")
    if not isinstance(doc, list):
        raise Malformed("bad_shape", f"HubSpot webhook body must be a JSON array, got {type(doc).__name__}")
    return doc


def adapt(raw: bytes | Any, ctx: Context) -> Adapted:
    out = Adapted()
    for i, item in enumerate(parse(raw)):
        gather(out, _adapt_one, item, f"[{i}]", ctx)
    return out


def _adapt_one(item: object, where: str, ctx: Context) -> Outcome:
    item = as_dict(item, where)
    kind, _, action = text(need(item, "subscriptionType", where), f"{where}.subscriptionType").partition(".")
    if kind == "object":
        type_id = item.get("objectTypeId")
        kind = _OBJECT_TYPES.get(type_id, "other") if isinstance(type_id, str) else "other"
    if kind not in ("deal", "contact"):
        return "unsupported_object"
    object_id = ident(need(item, "objectId", where), f"{where}.objectId")
    event: dict[str, Any] = {
        "event_id": f"hubspot:{ident(need(item, 'subscriptionId', where), f'{where}.subscriptionId')}"
        f":{ident(need(item, 'eventId', where), f'{where}.eventId')}",
        "occurred_at": from_epoch(need(item, "occurredAt", where), f"{where}.occurredAt"),
        "deal_id": f"hubspot:{kind}:{object_id}",
        "source": SOURCE,
    }
    if kind == "contact":
        event["pipeline"] = ctx.lifecycle_pipeline
    if action in _EXISTS:
        event["deleted"] = _EXISTS[action]
        return [event]
    if action != "propertyChange":
        return "unsupported_action"  # merges and associations: not guessed
    name = text(need(item, "propertyName", where), f"{where}.propertyName")
    value = item.get("propertyValue")
    if value is not None and not isinstance(value, str):
        raise Malformed("bad_field", f"{where}.propertyValue must be text (HubSpot sends strings)")
    # HubSpot clears a property by sending "" (the history API too): the dimension becomes null.
    properties = read_properties(ctx.dimensions(SOURCE), {name: value or None}, f"{where}.")
    fields = _fields(kind, name, value, f"{where}.propertyValue", ctx) if value else {}
    if not (fields or properties):
        return "unused_property" if value else "cleared_property"  # a cleared field: no change
    return [{**event, **fields, "properties": properties}]


_FIELDS = {"contact": {"lifecyclestage", "hubspot_owner_id"},
           "deal": {"dealstage", "amount", "deal_currency_code", "hubspot_owner_id", "closedate"}}


def _fields(kind: str, name: str, value: str, where: str, ctx: Context) -> dict[str, Any]:
    """The canonical fields one property of a deal or contact sets (none: not a funnel field)."""
    if name not in _FIELDS[kind]:
        # Includes ``pipeline``: a deal's pipeline follows from its stage id (see Context).
        return {}
    if name == "hubspot_owner_id":
        return {"owner": f"hubspot:owner:{ident(value, where)}"}
    if name == "lifecyclestage":
        return {"stage": value}
    if name == "dealstage":
        return {"stage": value, "pipeline": ctx.pipeline_of(SOURCE, value)}
    if name == "amount":
        return {"amount": amount(value, where)}
    if name == "deal_currency_code":
        return {"currency": currency(value, where)}
    return {"expected_close_at": from_epoch(value, where) if value.isdigit() else from_iso(value, where)}
