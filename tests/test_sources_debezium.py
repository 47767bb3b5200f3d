"""Debezium envelopes: create/update/delete/snapshot, tombstones, logical types, a session."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from models.deal import Outcome
from streams.crm.sources import debezium
from streams.crm.sources.common import Context, Gap, Malformed

from .test_sources_common import CONFIG, CTX, apply, assert_order_independent, fixture, kpis, raw
from .test_sources_properties import DIMS_CTX

MESSAGES = fixture("debezium_session.json")["messages"]
SNAPSHOT, CREATE_2, CREATE_3, SQL_2, WON_2, DELETE_3, TOMBSTONE_3, AMOUNT_1, NOTHING_2, WON_2_AGAIN = MESSAGES


def adapt(message: dict, ctx: Context = CTX) -> list[dict]:
    value = None if message["value"] is None else raw(message["value"])
    out = debezium.adapt(value, ctx, raw(message["key"]))
    assert not out.rejects, out.rejects
    return out.events


def test_reference_update_example():
    # the constructed stage change of shared/reference/crm-sources.md §2d
    event = {
        "before": {
            "id": 42,
            "stage": "proposal",
            "status": "open",
            "amount": "12000.00",
            "currency": "EUR",
            "owner_id": 7,
            "updated_at": 1741082000000,
        },
        "after": {
            "id": 42,
            "stage": "won",
            "status": "won",
            "amount": "12000.00",
            "currency": "EUR",
            "owner_id": 7,
            "updated_at": 1741083300000,
        },
        "source": {
            "version": "2.5.0.Final",
            "connector": "postgresql",
            "name": "crm",
            "ts_ms": 1741083300123,
            "snapshot": "false",
            "db": "crm",
            "schema": "public",
            "table": "deals",
            "txId": 884211,
            "lsn": 28581784,
            "xmin": None,
        },
        "op": "u",
        "ts_ms": 1741083300456,
        "transaction": None,
    }
    assert adapt({"key": {"id": 42}, "value": event}) == [
        {
            "event_id": "debezium:deals:42:28581784",
            "occurred_at": "2025-03-04T10:15:00.123Z",
            "deal_id": "debezium:deals:42",
            "source": "debezium",
            "stage": "won",
        }
    ]


def test_create_maps_every_configured_column():
    (event,) = adapt(CREATE_2)
    assert {
        k: event[k] for k in ("stage", "amount", "currency", "owner", "account", "expected_close_at")
    } == {
        "stage": "lead",
        "amount": 900.0,
        "currency": "USD",
        "owner": "bob",
        "account": "acme",
        "expected_close_at": "2025-12-31T00:00:00.000Z",
    }
    assert event["deleted"] is False


def test_snapshot_row_decodes_connect_logical_types_and_uses_the_row_time():
    (event,) = adapt(SNAPSHOT)
    assert event["amount"] == 250.0  # Decimal: base64 two's complement, scale 2
    assert event["expected_close_at"] == "2025-12-31T00:00:00.000Z"  # io.debezium.time.Date: days
    assert event["occurred_at"] == "2025-11-01T08:00:00.000Z"  # MicroTimestamp updated_at, not snapshot time


def test_update_carries_only_changed_columns_and_delete_its_tombstone_is_skipped():
    assert adapt(AMOUNT_1)[0].keys() - {"event_id", "occurred_at", "deal_id", "source"} == {"amount"}
    assert debezium.adapt(raw(NOTHING_2["value"]), CTX).skipped == ["no_funnel_change"]
    (deleted,) = adapt(DELETE_3)
    assert deleted["deleted"] is True and deleted["deal_id"] == "debezium:deals:3"
    assert debezium.adapt(None, CTX).skipped == ["tombstone"]
    assert debezium.adapt(b"", CTX).skipped == ["tombstone"]


def test_redelivery_keeps_the_event_id():
    _, outcomes = apply(adapt(WON_2) + adapt(WON_2_AGAIN))
    assert outcomes == [Outcome.ACCEPTED, Outcome.DUPLICATE]


def test_column_map_is_configurable_and_the_key_supplies_a_missing_id():
    ctx = Context(CONFIG, debezium_columns={"stage": "phase", "owner": "", "id": "deal_no"})
    value = copy.deepcopy(CREATE_2["value"])
    value["after"]["phase"] = value["after"].pop("stage")
    (event,) = adapt({"key": {"deal_no": 77}, "value": value}, ctx)
    assert event["deal_id"] == "debezium:deals:77" and event["stage"] == "lead" and "owner" not in event


def test_truncate_is_a_gap_and_other_connectors_positions_work():
    truncate = {
        "before": None,
        "after": None,
        "op": "t",
        "source": {"connector": "postgresql", "table": "deals", "ts_ms": 1762160400000, "lsn": 1},
    }
    assert debezium.adapt(raw(truncate), CTX).gaps == [Gap("deals", "TRUNCATE", ())]
    mysql = copy.deepcopy(CREATE_2["value"])
    mysql["source"] = {
        "connector": "mysql",
        "table": "deals",
        "ts_ms": 1762160400000,
        "file": "binlog.000003",
        "pos": 4471,
        "row": 0,
    }
    assert debezium.adapt(raw(mysql), CTX).events[0]["event_id"] == "debezium:deals:2:binlog.000003:4471:0"


def test_integer_times_without_a_schema_are_refused_not_guessed():
    snapshot = copy.deepcopy(SNAPSHOT["value"]["payload"])
    out = debezium.adapt(raw(snapshot), CTX)
    assert [r.code for r in out.rejects] == ["bad_timestamp"] and "schema" in out.rejects[0].reason
    snapshot["after"]["updated_at"] = "2025-11-01T08:00:00Z"
    out = debezium.adapt(raw(snapshot), CTX)
    assert [r.code for r in out.rejects] == ["bad_amount"]  # base64 decimal without its schema


def test_variable_scale_decimal():
    value = copy.deepcopy(SNAPSHOT["value"])
    for part in value["schema"]["fields"][:2]:
        part["fields"][2] = {
            "type": "struct",
            "name": "io.debezium.data.VariableScaleDecimal",
            "field": "amount",
        }
    value["payload"]["after"]["amount"] = {
        "scale": 3,
        "value": base64.b64encode((123456).to_bytes(3, "big")).decode(),
    }
    assert adapt({"key": {"id": 1}, "value": value})[0]["amount"] == 123.456


@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: v.update(op="x"),
        lambda v: v["source"].pop("lsn"),
        lambda v: v["source"].pop("table"),
        lambda v: v["after"].update(stage=["a"]),
        lambda v: v["after"].update(deleted="yes"),
        lambda v: v["after"].update(currency="dollars"),
        lambda v: v.update(after=None),
    ],
)
def test_bad_values_reject_the_record(mutate):
    value = copy.deepcopy(CREATE_2["value"])
    mutate(value)
    out = debezium.adapt(raw(value), CTX)
    assert out.events == [] and out.rejects


@pytest.mark.parametrize(
    "body", [b"[]", b'{"id": 1, "stage": "won"}', b"{", json.dumps({"op": "c"}).encode()[:-1]]
)
def test_not_a_change_event(body):
    with pytest.raises(Malformed):
        debezium.adapt(body, CTX)


def test_scripted_session_gives_the_expected_funnel_in_any_order():
    events = [event for message in MESSAGES for event in adapt(message)]
    deals = assert_order_independent(events)
    counters = kpis(deals)
    assert counters["closed"] == {("default", "won"): 1}
    assert counters["open"] == {("default", "lead"): 1}
    assert counters["open_value"] == {("default", "lead", "USD"): 300_000_000}
    assert counters["rep_won"] == {("default", "bob", "USD"): 900_000_000}
    assert deals["debezium:deals:3"].is_deleted


def row_change(before: dict | None, after: dict, op: str = "u") -> dict:
    """AMOUNT_1 (an update of deal 1) with these columns changed."""
    message = copy.deepcopy(AMOUNT_1)
    value = message["value"]
    value["op"] = op
    value["after"].update(after)
    value["before"] = None if before is None else {**value["after"], **before}
    return message


def test_a_dimension_column_change_carries_only_the_property():
    (event,) = adapt(row_change({"region": "EMEA", "segment": "smb"}, {"region": "APAC", "segment": "smb"}),
                     DIMS_CTX)
    assert event["properties"] == {"region": "APAC"}
    assert set(event) == {"event_id", "occurred_at", "deal_id", "source", "properties"}


def test_a_column_set_to_null_clears_the_dimension():
    (event,) = adapt(row_change({"region": "EMEA"}, {"region": None}), DIMS_CTX)
    assert event["properties"] == {"region": None}


def test_columns_not_configured_as_dimensions_change_nothing():
    message = row_change({"title": "Deal 1", "region": "EMEA"}, {"title": "Deal one", "region": "APAC"})
    assert adapt(message) == []
    message = row_change({"title": "Deal 1"}, {"title": "Deal one", "region": "EMEA"})
    assert adapt(message, DIMS_CTX) == []


def test_without_a_before_image_an_update_gives_the_row_as_it_is_and_a_create_skips_nulls():
    (update,) = adapt(row_change(None, {"region": None, "segment": 7}), DIMS_CTX)
    assert update["properties"] == {"region": None, "segment": "7"}
    (create,) = adapt(row_change(None, {"region": None, "segment": True}, op="c"), DIMS_CTX)
    assert create["properties"] == {"segment": "true"}


def test_a_decimal_dimension_column_is_read_with_its_schema():
    message = row_change(None, {"region": base64.b64encode((12345).to_bytes(2, "big")).decode()})
    column = {"field": "region", "name": "org.apache.kafka.connect.data.Decimal",
              "parameters": {"scale": "2"}}
    message["value"] = {"schema": {"fields": [{"field": "after", "fields": [column]}]},
                        "payload": message["value"]}
    assert adapt(message, DIMS_CTX)[0]["properties"]["region"] == "123.45"
