"""Salesforce CDC: create/update/delete/undelete, multi-record events, gaps, leads, a session."""

from __future__ import annotations

import copy

import pytest

from models.deal import Outcome
from streams.crm.sources import salesforce
from streams.crm.sources.common import Gap, Malformed

from .test_sources_common import CTX, apply, assert_order_independent, fixture, kpis, raw
from .test_sources_properties import DIMS_CTX

MESSAGES = fixture("salesforce_session.json")["messages"]
(
    UPDATE_B,
    CREATE_AB,
    CREATE_C,
    DELETE_C,
    UNDELETE_C,
    GAP,
    OVERFLOW,
    WON_A,
    LEAD,
    LEAD_WORKING,
    LEAD_CONVERTED,
    ACCOUNT,
    WON_A_AGAIN,
) = MESSAGES
A, B, C = "006SM0000001Tb3YAE", "006SM0000001Tb4YAE", "006SM0000001Tb5YAE"


def adapt(message: dict) -> list[dict]:
    out = salesforce.adapt(raw(message), CTX)
    assert not out.rejects, out.rejects
    return out.events


def test_official_create_example():
    # Pub/Sub API developer guide's OpportunityChangeEvent CREATE (CloseDate as epoch ms)
    event = {
        "ChangeEventHeader": {
            "entityName": "Opportunity",
            "recordIds": ["006SM0000001Tb3YAE"],
            "changeType": "CREATE",
            "changeOrigin": "com/salesforce/api/soap/55.0;client=SfdcInternalAPI/",
            "transactionKey": "00000466-3d4f-bbe3-9c2b-5ab0fb45cc02",
            "sequenceNumber": 1,
            "commitTimestamp": 1652977933000,
            "commitNumber": 1652977933433528300,
            "commitUser": "005SM000000146PYAQ",
            "nulledFields": [],
            "diffFields": [],
            "changedFields": [],
        },
        "AccountId": "001SM0000000iibYAA",
        "Name": "Acme - 400 Widgets",
        "StageName": "Prospecting",
        "Amount": 40000,
        "Probability": 10,
        "ExpectedRevenue": None,
        "CloseDate": 1653955200000,
        "IsClosed": False,
        "IsWon": False,
        "ForecastCategory": "Pipeline",
        "ForecastCategoryName": "Pipeline",
        "CampaignId": None,
        "HasOpportunityLineItem": False,
    }
    assert adapt(event) == [
        {
            "event_id": "salesforce:00000466-3d4f-bbe3-9c2b-5ab0fb45cc02:1:006SM0000001Tb3YAE",
            "occurred_at": "2022-05-19T16:32:13.000Z",
            "deal_id": "salesforce:006SM0000001Tb3YAE",
            "source": "salesforce",
            "stage": "Prospecting",
            "pipeline": "default",
            "amount": 40000,
            "account": "salesforce:001SM0000000iibYAA",
            "expected_close_at": "2022-05-31T00:00:00.000Z",
            "properties": {"forecast_category": "Pipeline"},  # ForecastCategoryName: always read
        }
    ]


def test_one_event_for_several_records_fans_out():
    events = adapt(CREATE_AB)
    assert [e["deal_id"] for e in events] == [f"salesforce:{A}", f"salesforce:{B}"]
    assert len({e["event_id"] for e in events}) == 2
    assert events[0]["expected_close_at"] == "2025-12-15T00:00:00.000Z"  # streaming API date text
    assert {e["stage"] for e in events} == {"Prospecting"} and events[0]["currency"] == "USD"


def test_update_carries_only_the_non_null_fields():
    (event,) = adapt(UPDATE_B)
    assert {k for k in event if k not in ("event_id", "occurred_at", "deal_id", "source")} == {
        "stage",
        "pipeline",
        "amount",
    }
    nulled = copy.deepcopy(UPDATE_B)
    nulled["Amount"] = None
    nulled["ChangeEventHeader"]["nulledFields"] = ["Amount"]
    assert "amount" not in adapt(nulled)[0]  # a cleared amount has no canonical form


def test_delete_and_undelete():
    (deleted,) = adapt(DELETE_C)
    assert deleted["deleted"] is True and set(deleted) == {
        "event_id",
        "occurred_at",
        "deal_id",
        "source",
        "deleted",
    }
    (undeleted,) = adapt(UNDELETE_C)
    assert undeleted["deleted"] is False and undeleted["stage"] == "Qualification"


def test_gap_events_are_reported_not_guessed():
    out = salesforce.adapt(raw(GAP), CTX)
    assert out.events == [] and out.gaps == [Gap("Opportunity", "GAP_UPDATE", ("006SM0000001Tb6YAE",))]
    assert salesforce.adapt(raw(OVERFLOW), CTX).gaps == [Gap("Opportunity", "GAP_OVERFLOW", ())]
    wildcard = copy.deepcopy(UPDATE_B)
    wildcard["ChangeEventHeader"]["recordIds"] = ["006*"]
    assert salesforce.adapt(raw(wildcard), CTX).gaps == [Gap("Opportunity", "UPDATE", ("006*",))]


def test_leads_follow_their_status_in_the_lifecycle_pipeline():
    events = adapt(LEAD) + adapt(LEAD_WORKING) + adapt(LEAD_CONVERTED)
    assert {e["pipeline"] for e in events} == {"lifecycle"}
    assert [CTX.config.map_stage("salesforce", "lifecycle", e["stage"]) for e in events] == [
        "lead",
        "mql",
        "won",
    ]


def test_streaming_envelope_and_redelivery_keep_the_event_id():
    assert adapt(WON_A) == adapt(WON_A_AGAIN) == adapt(WON_A["data"]["payload"])
    _, outcomes = apply(adapt(WON_A) + adapt(WON_A_AGAIN))
    assert outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE]


def test_other_entities_are_skipped():
    assert salesforce.adapt(raw(ACCOUNT), CTX).skipped == ["unsupported_object"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m["ChangeEventHeader"].update(recordIds=["not an id"]),
        lambda m: m["ChangeEventHeader"].update(commitTimestamp="noon"),
        lambda m: m["ChangeEventHeader"].pop("transactionKey"),
        lambda m: m.update(Amount=-1),
        lambda m: m.update(StageName=""),
        lambda m: m["ChangeEventHeader"].update(changeType="MERGE"),
        lambda m: m["ChangeEventHeader"].update(recordIds=[]),
    ],
)
def test_bad_values_reject_the_message(mutate):
    message = copy.deepcopy(UPDATE_B)
    mutate(message)
    out = salesforce.adapt(raw(message), CTX)
    assert out.events == [] and out.rejects


@pytest.mark.parametrize("body", [b"[]", b'{"data": {"payload": {}}}', b"\x00", b'{"ChangeEventHeader": 5}'])
def test_not_a_change_event(body):
    with pytest.raises(Malformed):
        salesforce.adapt(body, CTX)


def test_scripted_session_gives_the_expected_funnel_in_any_order():
    events = [event for message in MESSAGES for event in adapt(message)]
    deals = assert_order_independent(events)
    counters = kpis(deals)
    assert counters["closed"] == {("default", "won"): 1, ("lifecycle", "won"): 1}
    assert counters["open"] == {("default", "opportunity"): 1, ("default", "mql"): 1}
    assert counters["open_value"] == {
        ("default", "opportunity", "USD"): 1_200_000_000,
        ("default", "mql", "USD"): 400_000_000,
    }
    assert counters["won_revenue"] == {("default", "USD"): 1_000_000_000}
    assert counters["rep_won"] == {("default", "salesforce:005SM000000146PYAQ", "USD"): 1_000_000_000}


def dimension_update(fields: dict, nulled: list[str], changed: list[str]) -> dict:
    """An UPDATE as CDC sends it: the changed fields' values, the cleared ones named only."""
    message = copy.deepcopy(UPDATE_B)
    header = message["ChangeEventHeader"]
    header.update(nulledFields=nulled, changedFields=[*changed, "LastModifiedDate"])
    return {"ChangeEventHeader": header, "LastModifiedDate": "2025-11-06T09:00:00.000Z", **fields}


def test_custom_field_changes_become_properties():
    out = salesforce.adapt(raw(dimension_update({"Region__c": "EMEA", "Type": "New Customer"}, [],
                                                ["Region__c", "Type"])), DIMS_CTX)
    (event,) = out.events
    assert event["properties"] == {"region": "EMEA", "segment": "New Customer"}
    assert set(event) == {"event_id", "occurred_at", "deal_id", "source", "properties"}


def test_nulled_fields_clear_a_dimension_and_a_null_alone_changes_nothing():
    message = dimension_update({"Region__c": None, "Type": None}, ["Region__c"], ["Region__c"])
    (event,) = salesforce.adapt(raw(message), DIMS_CTX).events
    assert event["properties"] == {"region": None}  # Type is null but not nulled: unchanged


def test_fields_not_configured_as_dimensions_change_nothing():
    message = dimension_update({"Region__c": "EMEA", "Description": "x"}, ["NextStep"],
                               ["Region__c", "Description", "NextStep"])
    assert salesforce.adapt(raw(message), CTX).skipped == ["no_funnel_change"]
    message = dimension_update({"Description": "x"}, ["NextStep"], ["Description", "NextStep"])
    assert salesforce.adapt(raw(message), DIMS_CTX).skipped == ["no_funnel_change"]


def test_a_create_carries_its_dimensions_with_the_funnel_fields():
    message = copy.deepcopy(CREATE_AB)
    message.update(Region__c="EMEA", Type=None)  # a create's nulls are no values, not clears
    events = salesforce.adapt(raw(message), DIMS_CTX).events
    assert [e["properties"] for e in events] == [{"forecast_category": "Pipeline", "region": "EMEA"}] * 2
    assert all(e["stage"] == "Prospecting" for e in events)
    numeric = dimension_update({"Region__c": 4.0, "Type": True}, [], ["Region__c", "Type"])
    assert salesforce.adapt(raw(numeric), DIMS_CTX).events[0]["properties"] == {
        "region": "4", "segment": "true"}
