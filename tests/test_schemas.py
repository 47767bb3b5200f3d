"""Committed JSON Schemas are what the models produce, and real messages validate against them."""

import json

import jsonschema
import orjson

from models.alerts import stall_alert
from models.schemas import SCHEMA_DIR, render
from streams.tools.dataset import dataset_events

from .conftest import DATASET


def test_committed_schemas_are_up_to_date():
    rendered = render()
    committed = {p.name: p.read_text() for p in SCHEMA_DIR.glob("*.json")}
    assert committed == rendered, "run `python -m models.schemas` and commit schemas/"


def validator(name):
    schema = json.loads((SCHEMA_DIR / name).read_text())
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def test_canonical_events_validate():
    check = validator("crm-event.v1.json")
    for event in list(dataset_events(DATASET))[:500]:
        check.validate(orjson.loads(orjson.dumps(event)))
    assert not check.is_valid({"event_id": "e", "deal_id": "d"})


def test_alerts_validate():
    alert = stall_alert("deal.stalled", deal_id="d", pipeline="default", stage="lead",
                        entered_ms=0, now_ms=10**12, stall_after=60.0, amount=1.0,
                        currency="USD", owner="ann")
    validator("alert.v1.json").validate(json.loads(alert.model_dump_json(exclude_none=True)))
