"""Backfill and the live stream converge (pure: the deal state machine over canonical events).

The vendor answers in ``tests/fixtures/backfill_*.json`` describe the deals of the webhook / CDC
sessions (``*_session.json``). The backfill's events alone build the KPIs the session builds;
backfill plus session, in any order and with a second backfill run, builds what the session
alone builds; the stage history has no doubled entries.
"""

from __future__ import annotations

import itertools
import random

import pytest

from models.aggregates import stays_of
from models.deal import SAME_CHANGE_MS, Deal, Outcome
from streams.crm.backfill import hubspot, pipedrive, salesforce
from streams.crm.backfill.common import Page, limit_history
from streams.crm.sources import hubspot as live_hubspot
from streams.crm.sources import pipedrive as live_pipedrive
from streams.crm.sources import salesforce as live_salesforce
from streams.crm.sources.common import from_epoch

from .test_sources_common import CONFIG, CTX, apply, fixture, kpis, raw
from .test_sources_properties import DIMS_CTX, PIPEDRIVE_REGION, latest_properties


def kpi_state(deal: Deal) -> tuple:
    """Everything a KPI reads of a deal: field values, current owner, the stays (nothing of a
    deleted deal: deleted deals are backfilled as deletions, their values are not read)."""
    if deal.is_deleted:
        return ("deleted",)
    return (deal.value("pipeline"), deal.value("amount"), deal.value("currency"), deal.value("account"),
            deal.value("expected_close_at"), deal.owner, stays_of(deal, CONFIG))


def hubspot_backfill() -> list[dict]:
    doc = fixture("backfill_hubspot.json")
    page = Page(0, [], None)
    for deal in doc["deals"]:
        page.add(hubspot.deal_events(deal, CTX))
    for deal in doc["archived"]:
        page.add(hubspot.archived_events(deal, CTX))
    assert page.rejects == [] and page.skipped == {}
    return page.events


def pipedrive_backfill() -> list[dict]:
    doc = fixture("backfill_pipedrive.json")
    page = Page(0, [], None)
    for deal in doc["deals"]:
        page.add(pipedrive.deal_events(deal, doc["flows"][str(deal["id"])], CTX))
    for deal in doc["deleted"]:
        page.add(pipedrive.deleted_events(deal, CTX))
    assert page.rejects == []
    return page.events


def salesforce_backfill() -> list[dict]:
    doc = fixture("backfill_salesforce.json")
    page = Page(0, [], None)
    for opp in doc["opportunities"]:
        rows = [row for row in doc["history"] if row["OpportunityId"] == opp["Id"]]
        page.add(salesforce.deal_events(opp, rows, CTX))
    assert page.rejects == []
    return page.events


def live_events(name: str) -> list[dict]:
    adapter, key = {"hubspot": (live_hubspot, "bodies"), "pipedrive": (live_pipedrive, "bodies"),
                    "salesforce": (live_salesforce, "messages")}[name]
    events = []
    for payload in fixture(f"{name}_session.json")[key]:
        events += adapter.adapt(raw(payload), CTX).events
    # Deals only: HubSpot contacts and Salesforce leads are not backfilled.
    return [e for e in events if not e["deal_id"].startswith(("hubspot:contact:", "salesforce:00Q"))]


BACKFILLS = {"hubspot": hubspot_backfill, "pipedrive": pipedrive_backfill, "salesforce": salesforce_backfill}


def states(deals: dict[str, Deal]) -> dict[str, tuple]:
    return {deal_id: kpi_state(deal) for deal_id, deal in deals.items()}


@pytest.mark.parametrize("crm", sorted(BACKFILLS))
def test_backfill_alone_builds_the_state_of_the_live_session(crm):
    backfilled, _ = apply(BACKFILLS[crm]())
    live, _ = apply(live_events(crm))
    assert states(backfilled) == states(live)
    assert kpis(backfilled) == kpis(live)


@pytest.mark.parametrize("crm", sorted(BACKFILLS))
def test_backfill_plus_live_equals_live_alone_in_every_order(crm):
    backfill, session = BACKFILLS[crm](), live_events(crm)
    alone, _ = apply(session)
    orders = [backfill + session, session + backfill, session[: len(session) // 2] + backfill
              + session[len(session) // 2:]]
    rng = random.Random(16)
    for _ in range(20):
        mixed = [*backfill, *session, *backfill]  # a second backfill run among them
        rng.shuffle(mixed)
        orders.append(mixed)
    for events in orders:
        together, _ = apply(events)
        assert states(together) == states(alone)
        assert kpis(together) == kpis(alone)
        for deal_id, deal in together.items():  # no doubled stage entries
            assert history(deal) == history(alone[deal_id])


def history(deal: Deal) -> list[tuple[int, str]]:
    return [(ts, stage) for ts, _, stage in deal.history]


def test_sixty_stage_changes_seen_twice_stay_sixty_entries():
    # Twice the changes would pass the 64-entry cap and drop real ones, differently per order.
    stages = ["appointmentscheduled", "qualifiedtobuy", "presentationscheduled", "decisionmakerboughtin"]
    start = 1_762_160_400_000
    times = [start + i * 3_600_000 for i in range(60)]
    deal = {"id": "777", "createdAt": "2025-11-03T09:00:00.000Z", "updatedAt": "2025-11-05T20:00:00.000Z",
            "propertiesWithHistory": {"dealstage": [
                {"value": stages[i % 4], "timestamp": hubspot_time(ts), "sourceType": "CRM_UI"}
                for i, ts in reversed(list(enumerate(times)))]}}
    backfill = hubspot.deal_events(deal, CTX).events
    webhooks = [{"eventId": 7000 + i, "subscriptionId": 6547120, "portalId": 1, "occurredAt": ts + 250,
                 "subscriptionType": "deal.propertyChange", "attemptNumber": 0, "objectId": 777,
                 "propertyName": "dealstage", "propertyValue": stages[i % 4]} for i, ts in enumerate(times)]
    session = live_hubspot.adapt(raw(webhooks), CTX).events
    alone, _ = apply(session)
    assert len(alone["hubspot:deal:777"].history) == 60
    rng = random.Random(60)
    for _ in range(5):
        mixed = [*backfill, *session]
        rng.shuffle(mixed)
        together, _ = apply(mixed)
        assert history(together["hubspot:deal:777"]) == history(alone["hubspot:deal:777"])
        assert kpis(together) == kpis(alone)


def hubspot_time(ms: int) -> str:
    return from_epoch(ms, "ts")


def test_salesforce_history_twins_of_cdc_events_are_one_entry_whatever_the_order():
    # OpportunityHistory.CreatedDate has whole seconds; the CDC commit comes later, with ms.
    history = {"Id": "008SM0000000A09YAE", "OpportunityId": "006SM0000001Tb9YAE",
               "StageName": "Qualification", "Amount": 10, "CloseDate": "2025-12-15",
               "CreatedDate": "2025-11-05T09:00:00.000+0000"}
    opp = {"Id": "006SM0000001Tb9YAE", "OwnerId": "005SM000000146PYAQ", "IsDeleted": False,
           "SystemModstamp": "2025-11-05T09:00:00.000+0000"}
    backfill = salesforce.deal_events(opp, [history], CTX).events
    cdc = live_salesforce.adapt(raw({"ChangeEventHeader": {
        "entityName": "Opportunity", "recordIds": ["006SM0000001Tb9YAE"], "changeType": "CREATE",
        "transactionKey": "0000049a-1b2c", "sequenceNumber": 1, "commitTimestamp": 1762333200734},
        "StageName": "Qualification", "Amount": 10, "OwnerId": "005SM000000146PYAQ"}), CTX).events
    for events in (backfill + cdc, cdc + backfill):
        deals, _ = apply(events)
        assert [(ts, stage) for ts, _, stage in deals["salesforce:006SM0000001Tb9YAE"].history] == [
            (1762333200734, "mql")]


@pytest.mark.parametrize("crm", sorted(BACKFILLS))
def test_a_second_backfill_run_changes_nothing(crm):
    events = BACKFILLS[crm]()
    deals, _ = apply(events)
    before = {deal_id: (kpi_state(deal), list(deal.history)) for deal_id, deal in deals.items()}
    _, outcomes = apply(BACKFILLS[crm](), deals)
    assert set(outcomes) <= {Outcome.DUPLICATE, Outcome.STALE}
    assert {deal_id: (kpi_state(deal), list(deal.history)) for deal_id, deal in deals.items()} == before


def test_since_keeps_each_deals_state_and_drops_older_history():
    events = hubspot_backfill()
    limited = limit_history(events, "2025-11-06T00:00:00.000Z")
    assert len(limited) < len(events)
    full, _ = apply(events)
    cut, _ = apply(limited)
    for deal_id, deal in full.items():
        assert kpi_state(cut[deal_id])[:-1] == kpi_state(deal)[:-1]
        if not deal.is_deleted:
            assert stays_of(cut[deal_id], CONFIG)[1][-1] == stays_of(deal, CONFIG)[1][-1]
    # 101 was in qualifiedtobuy (mql) on the cut-off date: that entry is kept, older ones are not
    stays = stays_of(cut["hubspot:deal:101"], CONFIG)[1]
    assert [stage for _, stage in stays] == ["mql", "opportunity", "won"]


def test_a_real_return_to_a_stage_is_kept_and_only_near_twins_merge():
    def event(i: int, ms: int, stage: str) -> dict:
        return {"event_id": f"e{i}", "occurred_at": from_epoch(ms, "t"), "deal_id": "d", "stage": stage,
                "source": "test"}
    t = 1_762_160_400_000
    trip = [event(1, t, "lead"), event(2, t + 60_000, "mql"), event(3, t + 120_000, "lead")]
    twins = [event(4, t + 120_000 + SAME_CHANGE_MS, "lead"), event(5, t + 400, "lead")]
    for events in itertools.permutations(trip + twins):
        deals, _ = apply(list(events))
        assert history(deals["d"]) == [
            (t + 400, "lead"), (t + 60_000, "mql"), (t + 120_000 + SAME_CHANGE_MS, "lead")]


HOUR = 3_600_000
T0 = 1_762_160_400_000  # 2025-11-03T09:00:00Z


def assert_converge(backfill: list[dict], live: list[dict], expected: dict) -> None:
    """Backfill, live and both in any order (a second backfill run among them) end with the
    same dimension values."""
    assert latest_properties(backfill) == latest_properties(live) == expected
    rng = random.Random(23)
    for _ in range(10):
        mixed = [*backfill, *live, *backfill]
        rng.shuffle(mixed)
        assert latest_properties(mixed) == expected


def test_hubspot_dimension_history_converges_with_the_webhooks():
    changes = [("region_custom", "EMEA", T0), ("dealtype", "newbusiness", T0), ("description", "x", T0),
               ("region_custom", "APAC", T0 + 2 * HOUR), ("dealtype", "", T0 + 3 * HOUR)]
    history: dict[str, list] = {}
    for name, value, ts in changes:  # newest first, as HubSpot lists them
        history.setdefault(name, []).insert(0, {"value": value, "timestamp": hubspot_time(ts),
                                                "sourceType": "CRM_UI"})
    deal = {"id": "301", "createdAt": hubspot_time(T0), "updatedAt": hubspot_time(T0 + 3 * HOUR),
            "propertiesWithHistory": history}
    backfill = hubspot.deal_events(deal, DIMS_CTX).events
    assert f"hubspot:history:301-region_custom-{T0 + 2 * HOUR}" in {e["event_id"] for e in backfill}
    webhooks = [{"eventId": 8000 + i, "subscriptionId": 6547120, "portalId": 1, "occurredAt": ts + 250,
                 "subscriptionType": "deal.propertyChange", "objectId": 301, "propertyName": name,
                 "propertyValue": value} for i, (name, value, ts) in enumerate(changes)]
    live = live_hubspot.adapt(raw(webhooks), DIMS_CTX).events
    assert_converge(backfill, live, {"hubspot:deal:301": {"region": "APAC", "segment": None}})


def pipedrive_change(change_id: int, key: str, old, new, ms: int) -> dict:
    when = from_epoch(ms, "t")[:19].replace("T", " ")
    return {"object": "dealChange", "timestamp": when, "data": {
        "id": change_id, "item_id": 51, "field_key": key, "old_value": old, "new_value": new,
        "log_time": when, "change_source": "app"}}


def test_pipedrive_custom_field_flow_converges_with_the_webhooks():
    deal = {"id": 51, "status": "open", "stage_id": 1, "value": 100, "currency": "EUR", "owner_id": 7,
            "add_time": "2025-11-03T09:00:00Z", "label": None,
            "custom_fields": {PIPEDRIVE_REGION: 12, "0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b": "x"}}
    flow = [pipedrive_change(8002, "label", "9", None, T0 + 3 * HOUR),  # newest first
            pipedrive_change(8001, PIPEDRIVE_REGION, "11", "12", T0 + 2 * HOUR)]
    backfill = pipedrive.deal_events(deal, flow, DIMS_CTX).events
    (added,) = [e for e in backfill if e["event_id"] == "pipedrive:flow:51:add"]
    assert added["properties"] == {"region": "11", "segment": "9"}

    def webhook(action: str, ms: int, data: dict, previous: dict | None) -> dict:
        return {"meta": {"action": action, "entity": "deal", "entity_id": "51", "id": f"w{ms}",
                         "timestamp": from_epoch(ms, "t"), "version": "2.0"},
                "data": {**deal, **data}, "previous": previous}

    bodies = [webhook("create", T0, {"label": 9, "custom_fields": {PIPEDRIVE_REGION: 11}}, None),
              webhook("change", T0 + 2 * HOUR, {"label": 9},
                      {"custom_fields": {PIPEDRIVE_REGION: 11}}),
              webhook("change", T0 + 3 * HOUR, {}, {"label": 9})]
    live = [e for body in bodies for e in live_pipedrive.adapt(raw(body), DIMS_CTX).events]
    assert_converge(backfill, live, {"pipedrive:deal:51": {"region": "12", "segment": None}})


SF_OPP = "006SM0000001Tc9YAE"


def salesforce_opportunity() -> tuple[dict, list[dict]]:
    opp = {"Id": SF_OPP, "StageName": "Prospecting", "Amount": 10, "OwnerId": "005SM000000146PYAQ",
           "IsDeleted": False, "Region__c": "EMEA", "Type": None,
           "CreatedDate": "2025-11-03T09:00:00.000+0000", "SystemModstamp": "2025-11-03T12:00:00.000+0000"}
    history = [{"Id": "008SM0000000C01YAE", "OpportunityId": SF_OPP, "StageName": "Prospecting",
                "Amount": 10, "CloseDate": None, "CreatedDate": "2025-11-03T09:00:00.000+0000"}]
    return opp, history


def test_salesforce_field_history_converges_with_cdc():
    opp, history = salesforce_opportunity()
    field_history = [
        {"Id": "017SM0000000001YAE", "OpportunityId": SF_OPP, "Field": "Region__c", "NewValue": "APAC",
         "CreatedDate": "2025-11-03T09:00:00.000+0000"},
        {"Id": "017SM0000000002YAE", "OpportunityId": SF_OPP, "Field": "Type", "NewValue": "New Customer",
         "CreatedDate": "2025-11-03T09:00:00.000+0000"},
        {"Id": "017SM0000000003YAE", "OpportunityId": SF_OPP, "Field": "Region__c", "NewValue": "EMEA",
         "CreatedDate": "2025-11-03T10:00:00.000+0000"},
        {"Id": "017SM0000000004YAE", "OpportunityId": SF_OPP, "Field": "Type", "NewValue": None,
         "CreatedDate": "2025-11-03T11:00:00.000+0000"},
        {"Id": "017SM0000000005YAE", "OpportunityId": SF_OPP, "Field": "NextStep", "NewValue": "call",
         "CreatedDate": "2025-11-03T11:00:00.000+0000"}]
    backfill = salesforce.deal_events(opp, history, DIMS_CTX, field_history).events
    by_id = {e["event_id"]: e for e in backfill}
    assert by_id[f"salesforce:fieldhistory-017SM0000000004YAE:0:{SF_OPP}"]["properties"] == {"segment": None}
    assert f"salesforce:fieldhistory-017SM0000000005YAE:0:{SF_OPP}" not in by_id

    def cdc(change: str, ms: int, fields: dict, nulled: list[str]) -> dict:
        header = {"entityName": "Opportunity", "recordIds": [SF_OPP], "changeType": change,
                  "transactionKey": f"tx{ms}", "sequenceNumber": 1, "commitTimestamp": ms,
                  "nulledFields": nulled, "changedFields": [*fields, *nulled]}
        return {"ChangeEventHeader": header, **fields}

    messages = [cdc("CREATE", T0 + 700, {"StageName": "Prospecting", "Amount": 10, "Region__c": "APAC",
                                        "Type": "New Customer"}, []),
                cdc("UPDATE", T0 + HOUR + 700, {"Region__c": "EMEA"}, []),
                cdc("UPDATE", T0 + 2 * HOUR + 700, {}, ["Type"])]
    live = [e for m in messages for e in live_salesforce.adapt(raw(m), DIMS_CTX).events]
    assert_converge(backfill, live, {f"salesforce:{SF_OPP}": {"region": "EMEA", "segment": None}})


def test_salesforce_without_field_history_gives_the_values_now_on_the_current_event():
    opp, history = salesforce_opportunity()
    events = salesforce.deal_events(opp, history, DIMS_CTX).events
    (current,) = [e for e in events if "properties" in e]
    assert current["event_id"].startswith("salesforce:current-") and current["properties"] == {
        "region": "EMEA", "segment": None}


def test_since_keeps_the_last_value_of_each_dimension_before_it():
    def event(event_id: str, day: int, **fields) -> dict:
        return {"event_id": event_id, "occurred_at": f"2025-11-{day:02d}T00:00:00.000Z", "deal_id": "d",
                **fields}

    events = [event("a", 1, properties={"region": "EMEA", "segment": "ent"}),
              event("b", 2, properties={"region": "APAC"}),
              event("c", 3, properties={"segment": None}),
              event("e", 9, amount=5)]
    limited = limit_history(events, "2025-11-05T00:00:00.000Z")
    assert sorted(e["event_id"] for e in limited) == ["b", "c", "e"]  # a: superseded before
    assert latest_properties(limited) == latest_properties(events) == {"d": {"region": "APAC",
                                                                            "segment": None}}
