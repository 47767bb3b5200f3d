"""HubSpot: published signature test vectors, verification rules, every event kind, a session."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from models.deal import Outcome
from streams.crm.sources import hubspot
from streams.crm.sources.common import Malformed

from .test_sources_common import CTX, apply, assert_order_independent, fixture, kpis, raw
from .test_sources_properties import DIMS_CTX

EX = fixture("hubspot.json")
SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"  # HubSpot's documentation secret
URI = "https://www.example.com/webhook_uri"
LIB_BODY = b"{'example_field':'example_value'}"  # body of the vectors in HubSpot's Python client


def test_published_signature_vectors():
    # developers.hubspot.com "v1 request validation" example, body byte-exact as documented
    docs_body = (
        b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,'
        b'"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,'
        b'"changeSource":"CRM","changeFlag":"NEW","appId":54321}]'
    )
    assert (
        hubspot.signature_v1(SECRET, docs_body)
        == "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"
    )
    # HubSpot/hubspot-api-python tests/spec/utils/test_signature.py
    assert (
        hubspot.signature_v1(SECRET, LIB_BODY)
        == "69fc6631a867edd4f9e9e627fc5c1148e3fbdd8b21837b6d2b8901c1fa57f750"
    )
    assert (
        hubspot.signature_v2(SECRET, "POST", URI, LIB_BODY)
        == "4fe4e3a7d3cf09db53be39d0a58130e2aaba074ec123a9e355b876a689a1c383"
    )
    assert (
        hubspot.signature_v2(SECRET, "GET", URI, b"")
        == "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"
    )
    assert (
        hubspot.signature_v3(SECRET, "POST", URI, LIB_BODY, "15000000")
        == "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="
    )


def v3_headers(body: bytes, ts_ms: int, uri: str = URI, secret: str = SECRET) -> CIMultiDict:
    return CIMultiDict(
        {
            "X-HubSpot-Signature-v3": hubspot.signature_v3(secret, "POST", uri, body, str(ts_ms)),
            "X-HubSpot-Request-Timestamp": str(ts_ms),
        }
    )


def verify(headers, body=LIB_BODY, now_ms=1_700_000_000_000, versions=frozenset({"v3"}), uri=URI):
    return hubspot.verify(SECRET, versions, headers, "POST", uri, body, now_ms)


def test_v3_accepts_within_five_minutes_and_refuses_outside():
    now = 1_700_000_000_000
    assert verify(v3_headers(LIB_BODY, now - 299_000), now_ms=now) == "v3"
    assert verify(v3_headers(LIB_BODY, now + 299_000), now_ms=now) == "v3"  # small clock skew
    for stale in (now - 301_000, now + 301_000, 0):
        with pytest.raises(PermissionError, match="5-minute"):
            verify(v3_headers(LIB_BODY, stale), now_ms=now)


@pytest.mark.parametrize(
    "headers",
    [
        {},  # unsigned
        {"X-HubSpot-Signature-v3": "HPW73RUtKmcYoEDADG0s6MmGFWUzWJKAW07r8RDgcQw="},  # no timestamp
        {"X-HubSpot-Signature-v3": "", "X-HubSpot-Request-Timestamp": "1700000000000"},
        {"X-HubSpot-Signature-v3": "bm9wZQ==", "X-HubSpot-Request-Timestamp": "1700000000000"},
        {"X-HubSpot-Signature-v3": "é\udcff", "X-HubSpot-Request-Timestamp": "1700000000000"},
        {"X-HubSpot-Signature-v3": "x", "X-HubSpot-Request-Timestamp": "-1"},
        {"X-HubSpot-Signature-v3": "x", "X-HubSpot-Request-Timestamp": "9" * 400},
    ],
)
def test_unsigned_and_wrongly_signed_requests_are_refused(headers):
    with pytest.raises(PermissionError):
        verify(CIMultiDict(headers))


def test_the_signature_covers_body_uri_and_secret():
    now = 1_700_000_000_000
    good = v3_headers(LIB_BODY, now)
    with pytest.raises(PermissionError):
        verify(good, body=LIB_BODY + b" ", now_ms=now)
    with pytest.raises(PermissionError):
        verify(good, uri=URI + "?x=1", now_ms=now)
    with pytest.raises(PermissionError):
        verify(v3_headers(LIB_BODY, now, secret="other"), now_ms=now)
    # HubSpot decodes a few percent-escapes before signing: both spellings verify
    signed = v3_headers(LIB_BODY, now, uri="https://h.example/hooks?portal=1:2")
    assert verify(signed, uri="https://h.example/hooks?portal=1%3A2", now_ms=now) == "v3"


def test_v1_and_v2_only_where_configured():
    v1 = CIMultiDict(
        {"X-HubSpot-Signature": hubspot.signature_v1(SECRET, LIB_BODY), "X-HubSpot-Signature-Version": "v1"}
    )
    v2 = CIMultiDict(
        {
            "X-HubSpot-Signature": hubspot.signature_v2(SECRET, "POST", URI, LIB_BODY),
            "X-HubSpot-Signature-Version": "v2",
        }
    )
    with pytest.raises(PermissionError, match="accepted version"):
        verify(v1)
    assert verify(v1, versions=frozenset({"v1", "v3"})) == "v1"
    assert verify(v2, versions=frozenset({"v2"})) == "v2"
    with pytest.raises(PermissionError):  # a v1 signature claiming to be v2
        verify(CIMultiDict({**v1, "X-HubSpot-Signature-Version": "v2"}), versions=frozenset({"v1", "v2"}))


def adapt_one(item: dict) -> list[dict]:
    out = hubspot.adapt(raw([item]), CTX)
    assert not out.rejects, out.rejects
    return out.events


def test_deal_creation_deletion_and_restore():
    (created,) = adapt_one(EX["deal_creation"])
    assert created == {
        "event_id": "hubspot:6547118:3838838940",
        "occurred_at": "2026-06-25T07:19:30.000Z",
        "deal_id": "hubspot:deal:332507367156",
        "source": "hubspot",
        "deleted": False,
    }
    assert adapt_one(EX["deal_deletion"])[0]["deleted"] is True
    assert adapt_one(EX["deal_restore"])[0]["deleted"] is False
    assert adapt_one(EX["object_restore_deal"])[0]["deal_id"] == "hubspot:deal:332507367156"


def test_property_changes_one_field_each():
    (stage,) = adapt_one(EX["deal_stage"])
    assert (stage["stage"], stage["pipeline"]) == ("presentationscheduled", "default")
    assert adapt_one(EX["deal_amount"])[0]["amount"] == 2000.0
    assert adapt_one(EX["deal_owner"])[0]["owner"] == "hubspot:owner:10420865"
    assert adapt_one(EX["deal_closedate"])[0]["expected_close_at"] == "2024-07-01T00:00:00.000Z"
    (custom,) = adapt_one(EX["deal_stage_custom"])  # a custom pipeline's stage: no pipeline guessed
    assert custom["stage"] == "1f4f1ec1-8174-49f3-a112-4eaa4748e38e" and "pipeline" not in custom


def test_contact_lifecycle_is_its_own_pipeline_mapped_by_the_shipped_config():
    (event,) = adapt_one(EX["contact_lifecycle"])
    assert event["deal_id"] == "hubspot:contact:17001" and event["pipeline"] == "lifecycle"
    assert CTX.config.map_stage("hubspot", "lifecycle", event["stage"]) == "sql"
    assert CTX.config.map_stage("hubspot", "lifecycle", "customer") == "won"
    for ignored in ("subscriber", "evangelist", "other"):
        assert CTX.config.map_stage("hubspot", "lifecycle", ignored) is None
    assert adapt_one(EX["contact_privacy_deletion"])[0]["deleted"] is True


def test_what_the_funnel_does_not_use_is_skipped_not_rejected():
    body = [
        EX["deal_pipeline"],
        EX["deal_merge"],
        EX["company_creation"],
        {**EX["deal_amount"], "propertyValue": ""},
        {**EX["deal_owner"], "propertyName": "dealname"},
    ]
    out = hubspot.adapt(raw(body), CTX)
    assert out.events == [] and out.rejects == []
    assert sorted(out.skipped) == [
        "cleared_property",
        "unsupported_action",
        "unsupported_object",
        "unused_property",
        "unused_property",
    ]


def test_a_bad_record_is_rejected_alone():
    body = [
        EX["deal_amount"],
        {**EX["deal_amount"], "propertyValue": "-5"},
        {**EX["deal_stage"], "occurredAt": "soon"},
        {**EX["deal_stage"], "propertyValue": 7},
        "not an object",
        {**EX["deal_stage"], "objectId": None},
    ]
    out = hubspot.adapt(raw(body), CTX)
    assert len(out.events) == 1
    assert [r.code for r in out.rejects] == [
        "bad_amount",
        "bad_timestamp",
        "bad_field",
        "bad_shape",
        "missing_field",
    ]
    assert "[1].propertyValue" in out.rejects[0].reason


@pytest.mark.parametrize("body", [b"", b"{}", b'{"eventId": 1}', b"[1,", b"\xff\xfe", b"null"])
def test_a_body_that_is_not_an_event_array_is_malformed(body):
    with pytest.raises(Malformed):
        hubspot.adapt(body, CTX)


def test_retries_keep_the_event_id_so_the_deal_agent_drops_them():
    first = adapt_one(EX["deal_amount"])
    retry = adapt_one({**EX["deal_amount"], "attemptNumber": 3})
    assert first == retry
    _, outcomes = apply(first + retry)
    assert outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE]


def session_events() -> list[dict]:
    events = []
    for body in fixture("hubspot_session.json")["bodies"]:
        out = hubspot.adapt(raw(body), CTX)
        assert out.rejects == []
        events += out.events
    return events


def test_scripted_session_gives_the_expected_funnel_in_any_order():
    deals = assert_order_independent(session_events())
    counters = kpis(deals)
    assert counters["closed"] == {("default", "won"): 1, ("default", "lost"): 1, ("lifecycle", "won"): 1}
    assert counters["open"] == {("default", "lead"): 1, ("default", "mql"): 1, ("lifecycle", "lead"): 1}
    assert counters["open_value"] == {
        ("default", "lead", "USD"): 700_000_000,
        ("default", "mql", "USD"): 1_500_000_000,
    }
    assert counters["won_revenue"] == {("default", "USD"): 5_000_000_000}
    assert counters["rep_won"] == {("default", "hubspot:owner:111", "USD"): 5_000_000_000}
    assert deals["hubspot:deal:103"].owner == "hubspot:owner:222"
    assert deals["hubspot:deal:105"].is_deleted and not deals["hubspot:deal:104"].is_deleted


def dimension_change(name: str, value: object, **extra) -> dict:
    return {**EX["deal_amount"], "propertyName": name, "propertyValue": value, **extra}


def test_a_dimension_property_change_carries_only_the_property():
    out = hubspot.adapt(raw([dimension_change("region_custom", "EMEA"),  # a custom property
                             dimension_change("dealtype", "newbusiness")]), DIMS_CTX)
    assert out.rejects == [] and [e["properties"] for e in out.events] == [
        {"region": "EMEA"}, {"segment": "newbusiness"}]
    assert set(out.events[0]) == {"event_id", "occurred_at", "deal_id", "source", "properties"}
    assert out.events[0]["deal_id"] == "hubspot:deal:332507367156"


def test_a_cleared_dimension_is_null_and_a_cleared_funnel_field_still_skipped():
    out = hubspot.adapt(raw([dimension_change("region_custom", ""), dimension_change("region_custom", None),
                             dimension_change("amount", "")]), DIMS_CTX)
    assert [e["properties"] for e in out.events] == [{"region": None}, {"region": None}]
    assert out.skipped == ["cleared_property"]


def test_a_property_not_configured_as_a_dimension_gives_nothing():
    out = hubspot.adapt(raw([dimension_change("region_custom", "EMEA")]), CTX)  # no dimensions
    assert out.events == [] and out.skipped == ["unused_property"]
    out = hubspot.adapt(raw([dimension_change("description", "EMEA")]), DIMS_CTX)
    assert out.events == [] and out.skipped == ["unused_property"]
    (amount,) = hubspot.adapt(raw([EX["deal_amount"]]), DIMS_CTX).events
    assert "properties" not in amount


def test_a_dimension_value_too_long_is_rejected_not_cut():
    out = hubspot.adapt(raw([dimension_change("region_custom", "x" * 513),
                             dimension_change("region_custom", "x" * 512)]), DIMS_CTX)
    assert [r.code for r in out.rejects] == ["bad_property"]
    assert "[0].region_custom" in out.rejects[0].reason and "512" in out.rejects[0].reason
    assert out.events[0]["properties"] == {"region": "x" * 512}
