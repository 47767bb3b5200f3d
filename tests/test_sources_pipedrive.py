"""Pipedrive webhooks v2 (and v1): every deal event kind, duplicates, order, a session."""

from __future__ import annotations

import copy

import pytest

from models.deal import Outcome
from streams.crm.sources import pipedrive
from streams.crm.sources.common import Malformed

from .test_sources_common import CTX, apply, assert_order_independent, fixture, kpis, raw
from .test_sources_properties import DIMS_CTX, PIPEDRIVE_REGION

BODIES = fixture("pipedrive_session.json")["bodies"]
CREATE, MOVE, VALUE, WON, LOST, REOPEN, DELETE = (BODIES[i] for i in (0, 4, 5, 6, 7, 8, 9))

# Real v2 example (prismatic.io example payload): numeric ids, epoch-seconds timestamp.
PRISMATIC = {
    "meta": {
        "action": "change",
        "entity": "deal",
        "version": "2.0",
        "company_id": 12882925,
        "user_id": 18487521,
        "id": 1,
        "entity_id": 1,
        "webhook_id": 99,
        "webhook_owner_id": 18487521,
        "permitted_user_ids": [18487521],
        "attempt": 1,
        "host": "company.pipedrive.com",
        "timestamp": 1727447128,
        "change_source": "app",
    },
    "data": {
        "id": 1,
        "title": "test deal",
        "value": 2,
        "currency": "USD",
        "status": "open",
        "stage_id": 1,
        "pipeline_id": 1,
        "owner_id": 18487521,
        "person_id": 3,
        "org_id": 2,
        "add_time": "2024-09-27T14:25:27Z",
        "update_time": "2024-09-27T14:25:28Z",
    },
    "previous": None,
}
# v1 format (PipedreamHQ test event shape): whole objects in current/previous.
V1 = {
    "v": 1,
    "matches_filters": {"current": [], "previous": []},
    "meta": {
        "v": 1,
        "action": "updated",
        "object": "deal",
        "id": 42,
        "company_id": 12882925,
        "user_id": 18487521,
        "host": "company.pipedrive.com",
        "timestamp": 1741083300,
        "timestamp_micro": 1741083300384700,
        "permitted_user_ids": [18487521],
        "trans_pending": False,
        "is_bulk_update": False,
        "pipedrive_service_name": False,
        "webhook_id": "12345678",
    },
    "current": {
        "id": 42,
        "title": "Acme",
        "value": 12000,
        "currency": "EUR",
        "status": "open",
        "stage_id": 4,
        "pipeline_id": 1,
        "user_id": 18487521,
        "org_id": 2,
        "expected_close_date": None,
    },
    "previous": {
        "id": 42,
        "title": "Acme",
        "value": 10000,
        "currency": "EUR",
        "status": "open",
        "stage_id": 2,
        "pipeline_id": 1,
        "user_id": 18487521,
        "org_id": 2,
        "expected_close_date": None,
    },
    "event": "updated.deal",
    "retry": 0,
}


def adapt(body: dict) -> list[dict]:
    out = pipedrive.adapt(raw(body), CTX)
    assert not out.rejects, out.rejects
    return out.events


def test_create_carries_the_whole_deal():
    (event,) = adapt(CREATE)
    assert event == {
        "event_id": "pipedrive:7c1e9a52-0d7e-4a55-9a0e-000000000001",
        "occurred_at": "2025-11-03T09:00:00.000Z",
        "deal_id": "pipedrive:deal:1",
        "source": "pipedrive",
        "pipeline": "default",
        "stage": "1",
        "amount": 2000,
        "currency": "USD",
        "owner": "pipedrive:user:18487521",
        "account": "pipedrive:org:2",
        "expected_close_at": "2025-12-31T00:00:00.000Z",
    }
    (real,) = adapt({**PRISMATIC, "meta": {**PRISMATIC["meta"], "action": "create"}})
    assert real["occurred_at"] == "2024-09-27T14:25:28.000Z" and real["event_id"] == "pipedrive:1"


def test_a_change_carries_only_what_changed():
    (move,) = adapt(MOVE)
    assert (move["stage"], move["pipeline"]) == ("3", "default") and "amount" not in move
    (value,) = adapt(VALUE)
    assert value["amount"] == 300 and "stage" not in value


def test_won_lost_reopen_follow_the_deal_status():
    assert adapt(WON)[0]["stage"] == "won"
    assert adapt(LOST)[0]["stage"] == "lost"
    assert adapt(REOPEN)[0]["stage"] == "4"  # back to the open stage it had


def test_delete_and_restore():
    (deleted,) = adapt(DELETE)
    assert deleted["deleted"] is True and deleted["deal_id"] == "pipedrive:deal:3"
    restore = copy.deepcopy(VALUE)
    restore["previous"] = {"is_deleted": True}
    assert adapt(restore)[0]["deleted"] is False


def test_other_entities_and_title_changes_are_skipped():
    person = {**CREATE, "meta": {**CREATE["meta"], "entity": "person"}}
    assert pipedrive.adapt(raw(person), CTX).skipped == ["unsupported_object"]
    assert pipedrive.adapt(raw(BODIES[11]), CTX).skipped == ["no_funnel_change"]


def test_v1_is_diffed():
    (event,) = adapt(V1)
    assert event["amount"] == 12000 and event["stage"] == "4" and "owner" not in event
    assert event["occurred_at"] == "2025-03-04T10:15:00.384Z"
    merged = {**V1, "meta": {**V1["meta"], "action": "merged"}}
    assert pipedrive.adapt(raw(merged), CTX).skipped == ["unsupported_action"]


def test_a_retry_keeps_meta_id_so_it_is_a_duplicate():
    events = adapt(BODIES[10]) + adapt(BODIES[12])
    assert events[0] == events[1]
    _, outcomes = apply(events)
    assert outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE]


@pytest.mark.parametrize(
    "change",
    [
        {"data": {**WON["data"], "status": "archived"}},
        {"data": {**WON["data"], "value": -3}, "previous": {"value": 800}},
        {"data": {**WON["data"], "currency": "EURO"}, "previous": {"currency": "EUR"}},
        {"meta": {**WON["meta"], "timestamp": "next week"}},
        {"meta": {**WON["meta"], "id": None}},
        {"data": None},
    ],
)
def test_bad_values_reject_the_record(change):
    out = pipedrive.adapt(raw({**WON, **change}), CTX)
    assert out.events == [] and len(out.rejects) == 1


@pytest.mark.parametrize("body", [b"[]", b'{"data": {}}', b'{"meta": 1}', b"not json"])
def test_not_a_webhook_body(body):
    with pytest.raises(Malformed):
        pipedrive.adapt(body, CTX)


def test_scripted_session_gives_the_expected_funnel_in_any_order():
    events = [event for body in BODIES for event in adapt(body)]
    deals = assert_order_independent(events)
    counters = kpis(deals)
    assert counters["closed"] == {("default", "won"): 1, ("default", "lost"): 1}
    assert counters["open"] == {("default", "opportunity"): 1}
    assert counters["open_value"] == {("default", "opportunity", "USD"): 800_000_000}
    assert counters["won_revenue"] == {("default", "USD"): 2_000_000_000}
    assert counters["rep_won"] == {("default", "pipedrive:user:18487521", "USD"): 2_000_000_000}
    assert deals["pipedrive:deal:3"].is_deleted


OTHER_FIELD = "0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b"  # a custom field no dimension names


def custom_change(now: dict, before: dict, **data) -> dict:
    """A v2 change of custom fields: ``previous`` holds only what changed, under custom_fields."""
    body = copy.deepcopy(MOVE)
    body["data"].update(custom_fields=now, **data)
    body["previous"] = {"custom_fields": before, **{key: body["data"].get(key) for key in data}}
    return body


def test_v2_custom_field_change_carries_only_the_property():
    body = custom_change({PIPEDRIVE_REGION: 12, OTHER_FIELD: "x"}, {PIPEDRIVE_REGION: 11})
    (event,) = pipedrive.adapt(raw(body), DIMS_CTX).events
    assert event["properties"] == {"region": "12"}  # an enum field's option id, as text
    assert set(event) == {"event_id", "occurred_at", "deal_id", "source", "pipeline", "properties"}


def test_v2_cleared_custom_field_is_null_and_others_change_nothing():
    (event,) = pipedrive.adapt(raw(custom_change({PIPEDRIVE_REGION: None}, {PIPEDRIVE_REGION: 12})),
                               DIMS_CTX).events
    assert event["properties"] == {"region": None}
    other = custom_change({PIPEDRIVE_REGION: 12, OTHER_FIELD: "y"}, {OTHER_FIELD: "x"})
    assert pipedrive.adapt(raw(other), DIMS_CTX).skipped == ["no_funnel_change"]
    assert pipedrive.adapt(raw(custom_change({PIPEDRIVE_REGION: 12}, {PIPEDRIVE_REGION: 11})),
                           CTX).skipped == ["no_funnel_change"]


def test_v2_standard_field_and_set_field_as_dimensions():
    body = custom_change({PIPEDRIVE_REGION: [4, 7]}, {PIPEDRIVE_REGION: [4]}, label=9)
    body["previous"]["label"] = None
    (event,) = pipedrive.adapt(raw(body), DIMS_CTX).events
    assert event["properties"] == {"region": "4,7", "segment": "9"}


def test_v2_create_carries_the_dimensions_it_has():
    body = copy.deepcopy(CREATE)
    body["data"]["custom_fields"] = {PIPEDRIVE_REGION: {"value": 12, "label": "EMEA"}, OTHER_FIELD: "x"}
    (event,) = pipedrive.adapt(raw(body), DIMS_CTX).events
    assert event["properties"] == {"region": "12"} and event["stage"] == "1"  # label: no value yet


def test_v1_custom_fields_are_top_level_hash_keys_diffed_like_the_rest():
    current = {"id": 5, "status": "open", "stage_id": 1, "value": 10, PIPEDRIVE_REGION: "13",
               OTHER_FIELD: "b"}
    body = {"v": 1, "meta": {"action": "updated", "object": "deal", "id": 5, "timestamp": 1727447128},
            "current": current, "previous": {**current, PIPEDRIVE_REGION: None, OTHER_FIELD: "a"}}
    (event,) = pipedrive.adapt(raw(body), DIMS_CTX).events
    assert event["properties"] == {"region": "13"} and "stage" not in event
    body["previous"][PIPEDRIVE_REGION] = "13"
    assert pipedrive.adapt(raw(body), DIMS_CTX).skipped == ["no_funnel_change"]
    body["current"] = {**current, PIPEDRIVE_REGION: None}
    assert pipedrive.adapt(raw(body), DIMS_CTX).events[0]["properties"] == {"region": None}


def test_a_dimension_value_that_is_no_value_is_rejected():
    body = custom_change({PIPEDRIVE_REGION: {"from": "a", "until": "b"}}, {PIPEDRIVE_REGION: None})
    (reject,) = pipedrive.adapt(raw(body), DIMS_CTX).rejects
    assert reject.code == "bad_property" and f"data.{PIPEDRIVE_REGION}" in reject.reason
