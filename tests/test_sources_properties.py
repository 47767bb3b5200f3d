"""Property tests: whatever a CRM (or an attacker) sends, an adapter returns valid canonical
events or raises :class:`Malformed` with a reason, never any other exception."""

from __future__ import annotations

import copy
import json
import sys

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.event import decode_event, encode_event
from streams.crm.adapt import convert
from streams.crm.sources import debezium, hubspot, pipedrive, salesforce
from streams.crm.sources.common import Adapted, Malformed

from .test_sources_common import CTX, NOW_MS, SKEW_MS, fixture

ADAPTERS = {
    "hubspot": lambda value: hubspot.adapt(value, CTX),
    "pipedrive": lambda value: pipedrive.adapt(value, CTX),
    "salesforce": lambda value: salesforce.adapt(value, CTX),
    "debezium": lambda value: debezium.adapt(value, CTX, b'{"id": 1}'),
}
EXAMPLES = {
    "hubspot": [fixture("hubspot_session.json")["bodies"][0]],
    "pipedrive": fixture("pipedrive_session.json")["bodies"][:2],
    "salesforce": fixture("salesforce_session.json")["messages"][:2],
    "debezium": [m["value"] for m in fixture("debezium_session.json")["messages"][:2]],
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
            assert isinstance(convert(source, value, None, CTX), Adapted)
