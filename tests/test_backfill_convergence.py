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
