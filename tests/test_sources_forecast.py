"""A CRM's own forecast category (issue 23, item 6): HubSpot ``hs_forecast_category`` and
Salesforce ``ForecastCategoryName`` become ``properties.forecast_category`` live and in the
backfills, with no config entry; the workers fold case and spelling, and a deal without one
falls back to its stage's category (docs/kpis.md, "Forecast categories")."""

from __future__ import annotations

import copy

import orjson

from models.config import Clock, FunnelConfig
from processors.clock import EventClock
from processors.deals import DealProcessor
from processors.records import Record
from streams.crm.backfill import hubspot as backfill_hubspot
from streams.crm.backfill import salesforce as backfill_salesforce
from streams.crm.backfill.settings import BackfillSettings
from streams.crm.sources import hubspot, salesforce

from .test_sources_common import CTX, raw
from .test_sources_properties import DIMS_CTX

SF_OPP = "006SM0000001Tb3YAE"
# The documented UPDATE of a stage move (Salesforce CDC developer guide; the reference's
# constructed example): ForecastCategoryName is among the changedFields.
SF_STAGE_MOVE = {
    "ChangeEventHeader": {
        "entityName": "Opportunity", "recordIds": [SF_OPP], "changeType": "UPDATE", "changeOrigin": "",
        "transactionKey": "0000046a-1b2c-4d5e-8f90-a1b2c3d4e5f6", "sequenceNumber": 1,
        "commitTimestamp": 1653500000000, "commitNumber": 1653500000123456789,
        "commitUser": "005SM000000146PYAQ", "nulledFields": [], "diffFields": [],
        "changedFields": ["StageName", "Probability", "ForecastCategoryName", "LastModifiedDate"]},
    "StageName": "Negotiation/Review", "Probability": 90, "ForecastCategoryName": "Pipeline",
    "LastModifiedDate": 1653500000000,
}


def categories(events: list[dict], config: FunnelConfig = CTX.config) -> dict[str, str]:
    """Deal → the forecast category the worker gives it (its open-deals index entry)."""
    proc = DealProcessor(config, EventClock(Clock.STREAM), max_skew_ms=86_400_000)
    records = [Record(None, orjson.dumps(event), "crm.events", 0, i) for i, event in enumerate(events)]
    assert not proc.process(records, {}.get).rejections
    return {key[4]: key[7] for fold in proc.folds.folds.values() for key, _ in fold.open_deal_keys()}


def hubspot_change(event_id: int, name: str, value: str, ms: int, deal: int = 7) -> dict:
    """A ``deal.propertyChange`` webhook event as HubSpot documents it."""
    return {"eventId": event_id, "subscriptionId": 6547120, "portalId": 1, "occurredAt": ms,
            "subscriptionType": "deal.propertyChange", "attemptNumber": 0, "objectId": deal,
            "changeSource": "CRM", "propertyName": name, "propertyValue": value}


def sf_update(ms: int, fields: dict, nulled: list[str] = ()) -> dict:
    message = copy.deepcopy(SF_STAGE_MOVE)
    header = message["ChangeEventHeader"]
    header.update(transactionKey=f"tx{ms}", commitTimestamp=ms, nulledFields=list(nulled),
                  changedFields=[*fields, *nulled, "LastModifiedDate"])
    return {"ChangeEventHeader": header, "LastModifiedDate": ms, **fields}


# ------------------------------------------------------------------ HubSpot webhooks
def test_hubspot_forecast_category_change_becomes_the_property():
    body = [hubspot_change(1, "hs_forecast_category", "BEST_CASE", 1714200000000)]
    (event,) = hubspot.adapt(raw(body), CTX).events
    assert event["properties"] == {"forecast_category": "BEST_CASE"}
    assert not {"stage", "amount", "owner"} & set(event)
    cleared = [hubspot_change(2, "hs_forecast_category", "", 1714200001000)]
    assert hubspot.adapt(raw(cleared), CTX).events[0]["properties"] == {"forecast_category": None}
    # read beside the configured dimensions
    both = [hubspot_change(3, "hs_forecast_category", "COMMIT", 1714200002000),
            hubspot_change(4, "region_custom", "EMEA", 1714200002000)]
    assert [e["properties"] for e in hubspot.adapt(raw(both), DIMS_CTX).events] == [
        {"forecast_category": "COMMIT"}, {"region": "EMEA"}]


def test_hubspot_deal_takes_its_crm_category_and_falls_back_to_its_stage_when_cleared():
    t0 = 1714200000000
    body = [hubspot_change(1, "dealstage", "decisionmakerboughtin", t0),
            hubspot_change(2, "amount", "1000", t0),
            hubspot_change(3, "hs_forecast_category", "BEST_CASE", t0 + 1000)]
    events = hubspot.adapt(raw(body), CTX).events
    assert categories(events) == {"hubspot:deal:7": "best_case"}
    cleared = hubspot.adapt(raw([hubspot_change(4, "hs_forecast_category", "", t0 + 2000)]), CTX).events
    assert categories(events + cleared) == {"hubspot:deal:7": "pipeline"}  # opportunity's default
    omit = hubspot.adapt(raw([hubspot_change(5, "hs_forecast_category", "OMIT", t0 + 3000)]), CTX).events
    assert categories(events + omit) == {"hubspot:deal:7": "omitted"}


# ------------------------------------------------------------------ Salesforce CDC
def test_salesforce_stage_move_carries_its_forecast_category():
    (event,) = salesforce.adapt(raw(SF_STAGE_MOVE), CTX).events
    assert event["stage"] == "Negotiation/Review"
    assert event["properties"] == {"forecast_category": "Pipeline"}


def test_salesforce_forecast_category_alone_is_a_change_and_nulled_clears_it():
    (event,) = salesforce.adapt(raw(sf_update(1653500001000, {"ForecastCategoryName": "Commit"})), CTX).events
    assert event["properties"] == {"forecast_category": "Commit"}
    assert "stage" not in event
    nulled = sf_update(1653500002000, {}, ["ForecastCategoryName"])
    assert salesforce.adapt(raw(nulled), CTX).events[0]["properties"] == {"forecast_category": None}


def test_salesforce_deal_takes_its_crm_category():
    best_case = sf_update(1653500001000, {"ForecastCategoryName": "Best Case"})
    events = [e for message in (SF_STAGE_MOVE, best_case) for e in salesforce.adapt(raw(message), CTX).events]
    assert categories(events) == {f"salesforce:{SF_OPP}": "best_case"}
    mapped = FunnelConfig.model_validate({**CTX.config.model_dump(mode="json", exclude_defaults=True),
                                          "forecast_categories": {"default": {"opportunity": "commit"}}})
    assert categories(events[:1], mapped) == {f"salesforce:{SF_OPP}": "pipeline"}  # the CRM's wins
    assert categories([{k: v for k, v in events[0].items() if k != "properties"}], mapped) == {
        f"salesforce:{SF_OPP}": "commit"}  # none from the CRM: the stage's


# ------------------------------------------------------------------ backfills
def test_hubspot_backfill_reads_the_forecast_category_history():
    assert "hs_forecast_category" in backfill_hubspot.properties_read(CTX)
    deal = {"id": "7", "createdAt": "2024-04-27T06:40:00.000Z", "updatedAt": "2024-04-27T09:00:00.000Z",
            "propertiesWithHistory": {
                "dealstage": [{"value": "decisionmakerboughtin", "timestamp": "2024-04-27T06:40:00.000Z"}],
                "hs_forecast_category": [  # newest first, as HubSpot lists them
                    {"value": "COMMIT", "timestamp": "2024-04-27T08:00:00.000Z"},
                    {"value": "PIPELINE", "timestamp": "2024-04-27T07:00:00.000Z"}]}}
    events = backfill_hubspot.deal_events(deal, CTX).events
    assert [e["properties"] for e in events if "properties" in e] == [
        {"forecast_category": "COMMIT"}, {"forecast_category": "PIPELINE"}]
    assert categories(events) == {"hubspot:deal:7": "commit"}


def test_salesforce_backfill_selects_the_field_and_reads_it_as_now():
    assert "ForecastCategoryName" in backfill_salesforce.OPPORTUNITY
    assert "ForecastCategoryName" in backfill_salesforce.SINGLE_CURRENCY
    opp = {"Id": SF_OPP, "StageName": "Negotiation/Review", "Amount": 10, "IsDeleted": False,
           "ForecastCategoryName": "Commit", "CreatedDate": "2025-11-03T09:00:00.000+0000",
           "SystemModstamp": "2025-11-03T12:00:00.000+0000"}
    history = [{"Id": "008SM0000000C01YAE", "OpportunityId": SF_OPP, "StageName": "Negotiation/Review",
                "Amount": 10, "CloseDate": None, "CreatedDate": "2025-11-03T09:00:00.000+0000"}]
    events = backfill_salesforce.deal_events(opp, history, CTX).events
    (current,) = [e for e in events if "properties" in e]
    assert current["event_id"].startswith("salesforce:current-")
    assert current["properties"] == {"forecast_category": "Commit"}
    assert categories(events) == {f"salesforce:{SF_OPP}": "commit"}


def test_salesforce_backfill_reads_no_field_history_for_the_forecast_category():
    settings = BackfillSettings(salesforce_instance_url="https://127.0.0.1:9",
                                salesforce_access_token="token")
    plain = backfill_salesforce.Reader(settings, CTX)
    assert "ForecastCategoryName" in plain.opportunity
    assert plain.tracked == [] and not plain.field_history  # no query per page for it
    dims = backfill_salesforce.Reader(settings, DIMS_CTX)
    assert dims.tracked == ["Region__c", "Type"] and dims.field_history
