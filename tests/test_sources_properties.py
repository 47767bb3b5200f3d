"""Property tests: whatever a CRM (or an attacker) sends, an adapter returns valid canonical
events or raises :class:`Malformed` with a reason, never any other exception; so do the
configured dimensions' values, whatever they are. Also the dimensions every adapter and backfill
test reads (:data:`DIMS_CTX`)."""

from __future__ import annotations

import copy
import json
import sys

import orjson
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.config import DEFAULT_CONFIG, FunnelConfig
from models.event import MAX_TEXT, decode_event, encode_event
from streams.crm.adapt import convert
from streams.crm.sources import debezium, hubspot, pipedrive, salesforce
from streams.crm.sources.common import Adapted, Context, Malformed
from streams.crm.sources.properties import property_text

from .test_sources_common import NOW_MS, SKEW_MS, fixture

PIPEDRIVE_REGION = "5f1a9c0e1e0c4b9d8e7f6a5b4c3d2e1f0a9b8c7d"  # a custom field's hash key
# A custom field and a standard one per source, as a funnel config names them.
DIMENSIONS = {
    "region": {"sources": {"hubspot": "region_custom", "salesforce": "Region__c",
                           "pipedrive": PIPEDRIVE_REGION, "debezium": "region", "csv": "regional_office"}},
    "segment": {"sources": {"hubspot": "dealtype", "salesforce": "Type", "pipedrive": "label",
                            "debezium": "segment", "csv": "sector"}},
}
DIMS_CTX = Context(FunnelConfig.model_validate(
    {**yaml.safe_load(DEFAULT_CONFIG.read_text()), "dimensions": DIMENSIONS})).check()


def latest_properties(events: list[dict]) -> dict[str, dict[str, str | None]]:
    """Deal → dimension → its value as the deal agent keeps it (last write wins per property,
    by event time then event id), before the workers' normalising."""
    latest: dict[tuple[str, str], tuple[str, str, str | None]] = {}
    for event in events:
        for name, value in (event.get("properties") or {}).items():
            key, stamp = (event["deal_id"], name), (event["occurred_at"], event["event_id"])
            if key not in latest or latest[key][:2] < stamp:
                latest[key] = (*stamp, value)
    deals: dict[str, dict[str, str | None]] = {}
    for (deal_id, name), (*_, value) in latest.items():
        deals.setdefault(deal_id, {})[name] = value
    return deals


ADAPTERS = {
    "hubspot": lambda value: hubspot.adapt(value, DIMS_CTX),
    "pipedrive": lambda value: pipedrive.adapt(value, DIMS_CTX),
    "salesforce": lambda value: salesforce.adapt(value, DIMS_CTX),
    "debezium": lambda value: debezium.adapt(value, DIMS_CTX, b'{"id": 1}'),
}
# A payload per source with both dimensions in it, so that their values get replaced too.
WITH_DIMENSIONS = {
    "hubspot": [{"eventId": 9, "subscriptionId": 1, "portalId": 1, "occurredAt": 1714200002000,
                 "subscriptionType": "deal.propertyChange", "objectId": 7,
                 "propertyName": "region_custom", "propertyValue": "EMEA"}],
    "pipedrive": {"meta": {"action": "change", "entity": "deal", "entity_id": "42", "id": "e1",
                           "timestamp": 1727447128},
                  "data": {"id": 42, "label": [3, 4], "custom_fields": {PIPEDRIVE_REGION: 12}},
                  "previous": {"label": [3], "custom_fields": {PIPEDRIVE_REGION: None}}},
    "salesforce": {"ChangeEventHeader": {"entityName": "Opportunity", "recordIds": ["006SM0000001Tb3YAE"],
                                         "changeType": "UPDATE", "transactionKey": "t1", "sequenceNumber": 1,
                                         "commitTimestamp": 1653500000000, "nulledFields": ["Type"],
                                         "changedFields": ["Region__c", "Type"]},
                   "Region__c": "EMEA"},
    "debezium": {"before": {"id": 1, "region": "EMEA", "segment": None},
                 "after": {"id": 1, "region": None, "segment": 5},
                 "source": {"table": "deals", "ts_ms": 1741083300123, "lsn": 1}, "op": "u"},
}
EXAMPLES = {
    "hubspot": [fixture("hubspot_session.json")["bodies"][0], WITH_DIMENSIONS["hubspot"]],
    "pipedrive": [*fixture("pipedrive_session.json")["bodies"][:2], WITH_DIMENSIONS["pipedrive"]],
    "salesforce": [*fixture("salesforce_session.json")["messages"][:2], WITH_DIMENSIONS["salesforce"]],
    "debezium": [*(m["value"] for m in fixture("debezium_session.json")["messages"][:2]),
                 WITH_DIMENSIONS["debezium"]],
}
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_text = st.text(st.characters(codec=None, categories=None), max_size=60)  # surrogates included
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**200)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
    | st.sampled_from(["", "0", "-1", "1e999", "NaN", "Infinity", "2025-13-45", "9" * 30, "\x00", "é" * 600])
)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=20,
)


def outcome(source: str, value) -> Adapted | Malformed:
    try:
        result = ADAPTERS[source](value)
    except Malformed as exc:
        assert exc.code and exc.reason and len(exc.reason) < 400
        return exc
    assert isinstance(result, Adapted)
    for event in result.events:  # every event is one the deal agent accepts as an event
        # (the earliest accepted time is the worker's setting: older ones go to its DLQ)
        decode_event(encode_event(event), now_ms=NOW_MS, max_skew_ms=SKEW_MS, min_ms=-(2**62))
    for reject in result.rejects:
        assert reject.code and len(reject.reason) < 400
    return result


def paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from paths(value, (*prefix, i))


def replaced(doc, path, value):
    if not path:
        return value
    doc = copy.deepcopy(doc)
    target = doc
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return doc


@PROPERTY
@given(source=st.sampled_from(sorted(ADAPTERS)), data=st.binary(max_size=300))
def test_random_bytes(source, data):
    outcome(source, data)


@PROPERTY
@given(source=st.sampled_from(sorted(ADAPTERS)), doc=json_like)
def test_random_documents_and_their_json(source, doc):
    outcome(source, doc)
    try:
        body = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):  # not representable as JSON: nothing to send
        return
    outcome(source, body)


@PROPERTY
@given(source=st.sampled_from(sorted(ADAPTERS)), data=st.data())
def test_realistic_payloads_with_one_value_replaced(source, data):
    example = data.draw(st.sampled_from(EXAMPLES[source]))
    path = data.draw(st.sampled_from(list(paths(example))))
    doc = replaced(example, path, data.draw(json_like))
    outcome(source, doc)
    try:
        body = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return
    outcome(source, body)  # NaN / Infinity literals and lone surrogates arrive as bytes too


def test_every_example_with_dimensions_reads_them():
    for source, doc in WITH_DIMENSIONS.items():
        result = outcome(source, doc)
        assert isinstance(result, Adapted) and result.rejects == [], (source, result)
        assert [event["properties"] for event in result.events] == [{
            "hubspot": {"region": "EMEA"},
            "pipedrive": {"region": "12", "segment": "3,4"},
            "salesforce": {"region": "EMEA", "segment": None},
            "debezium": {"region": None, "segment": "5"},
        }[source]]


@PROPERTY
@given(source=st.sampled_from(sorted(ADAPTERS)), value=json_like)
def test_any_dimension_value_is_read_as_text_or_refused(source, value):
    doc = copy.deepcopy(WITH_DIMENSIONS[source])
    if source == "hubspot":
        doc[0]["propertyValue"] = value
    elif source == "pipedrive":
        doc["data"]["custom_fields"][PIPEDRIVE_REGION] = value
    elif source == "salesforce":
        doc["Region__c"] = value
    else:
        doc["after"]["region"] = value
    result = outcome(source, doc)
    if isinstance(result, Adapted) and result.events:
        assert all(len(v) <= MAX_TEXT for v in result.events[0]["properties"].values() if v is not None)


def test_property_values_as_text():
    assert property_text("EMEA", "f") == "EMEA"
    assert property_text(None, "f") is None
    assert [property_text(v, "f") for v in (12, 12.0, 12.5, True, False)] == ["12", "12", "12.5", "true",
                                                                            "false"]
    assert property_text([3, "4", None], "f") == "3,4" and property_text([], "f") is None
    assert property_text({"value": 2300, "currency": "EUR"}, "f") == "2300"  # Pipedrive monetary
    assert property_text("x" * MAX_TEXT, "f") == "x" * MAX_TEXT
    for bad in ("x" * (MAX_TEXT + 1), [[1]], {"a": 1}, float("nan"), 10**600, ["y" * 300] * 2):
        try:
            property_text(bad, "data.region")
        except Malformed as exc:
            assert exc.code == "bad_property" and exc.reason.startswith("data.region")
        else:
            raise AssertionError(f"{bad!r:.40} was read")


def test_huge_values_and_deep_nesting():
    huge = "x" * 2_000_000
    for source, examples in EXAMPLES.items():
        example = examples[0]
        for path in list(paths(example))[1:]:
            outcome(source, replaced(example, path, huge))
        outcome(source, b"[" * 200_000 + b"]" * 200_000)
        outcome(source, b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
        nested: object = "leaf"
        for _ in range(sys.getrecursionlimit() * 3):
            nested = {"meta": nested, "ChangeEventHeader": nested, "op": "c", "after": nested}
        outcome(source, nested)
        outcome(source, [nested])


def test_the_bridge_guard_never_raises_either():
    for source in ADAPTERS:
        for value in (None, b"", b"\xff", b"[]", b"{}", b'"x"'):
            assert isinstance(convert(source, value, None, DIMS_CTX), Adapted)
