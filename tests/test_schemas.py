"""Committed JSON Schemas are what the models produce, and real messages validate against them."""

import json

import jsonschema
import orjson
import yaml

from models.alerts import stall_alert
from models.config import DEFAULT_CONFIG, FunnelConfig
from models.schemas import SCHEMA_DIR, render
from models.snapshot import KpiSnapshot, build_snapshot
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
    check = validator("crm-event.v2.json")
    for event in list(dataset_events(DATASET))[:500]:
        check.validate(orjson.loads(orjson.dumps(event)))
    assert not check.is_valid({"event_id": "e", "deal_id": "d"})


def validated_snapshot(samples, **config) -> dict:
    """The default pipeline's snapshot of ``samples`` under the shipped config with ``config``
    set: valid against the committed schema, read back as it was built."""
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    built = build_snapshot(samples, FunnelConfig.model_validate({**shipped, **config}), "default",
                           as_of_ms=0, generated_ms=0, generation=1, sequence=1, partitions=4,
                           top_customers=[])
    doc = json.loads(built.model_dump_json())
    validator("kpi-snapshot.v1.json").validate(doc)
    assert KpiSnapshot.model_validate_json(built.model_dump_json()) == built
    return doc


def test_alerts_validate():
    alert = stall_alert("deal.stalled", deal_id="d", pipeline="default", stage="lead",
                        entered_ms=0, now_ms=10**12, stall_after=60.0, amount=1.0,
                        currency="USD", owner="ann")
    validator("alert.v1.json").validate(json.loads(alert.model_dump_json(exclude_none=True)))


def test_snapshots_carry_the_team_leaderboard_only_when_reps_have_a_team():
    """Without teams a snapshot is what it was (no `teams` key: consumers of schema v1 keep
    working); with them, `teams` sums the reps' won revenue per team, unlisted reps in `none`,
    in the pipeline's currency only, largest first, and validates against the committed schema."""
    rep = [({"pipeline": "default", "owner": owner, "currency": currency}, value)
           for owner, currency, value in [("ann", "USD", 100.0), ("bo", "USD", 50.0),
                                          ("cy", "USD", 7.0), ("dee", "USD", 20.0),
                                          ("ann", "EUR", 1000.0)]]
    samples = {"funnel_rep_won_revenue": rep}

    def snapshot(owners):
        return validated_snapshot(samples, owners=owners)

    assert "teams" not in snapshot({}) and "teams" not in snapshot({"ann": "Ann", "bo": {"name": "Bo"}})
    doc = snapshot({"ann": {"name": "Ann", "team": "East"}, "bo": {"name": "Bo", "team": "East"},
                    "cy": "Cy", "dee": {"name": "Dee", "team": "West"}})
    assert doc["teams"] == [{"team": "East", "won_revenue": 150.0}, {"team": "West", "won_revenue": 20.0},
                            {"team": "none", "won_revenue": 7.0}]


def test_snapshots_carry_dimensions_only_when_the_config_names_them():
    """Without dimensions a snapshot is what it was (no `dimensions` key); with them, each named
    dimension lists its values, then `none` and `other`, and validates against the committed
    schema."""
    def row(value, **labels):
        return {"pipeline": "default", "dimension": "lead_source", "value": value, **labels}

    samples = {
        "funnel_dimension_deals_open": [(row("web", stage="mql"), 2.0), (row("none", stage="lead"), 1.0)],
        "funnel_dimension_open_value": [(row("web", stage="mql", currency="USD"), 300.0)],
        "funnel_dimension_deals_reached": [(row("web", stage="lead"), 4.0), (row("web", stage="mql"), 3.0)],
        "funnel_dimension_deals_closed": [(row("web", outcome="won", currency="USD"), 1.0),
                                          (row("web", outcome="lost", currency="USD"), 1.0)],
        "funnel_dimension_time_to_close_seconds": [(row("web", outcome="won"), 86400.0)],
        "funnel_dimension_won_revenue": [(row("web", currency="USD"), 500.0)],
    }

    def snapshot(dimensions):
        return validated_snapshot(samples, dimensions=dimensions)

    assert "dimensions" not in snapshot({})
    doc = snapshot({"lead_source": {}, "region": {"max_values": 5}})
    assert [v["value"] for v in doc["dimensions"]["lead_source"]] == ["web", "none", "other"]
    assert [v["value"] for v in doc["dimensions"]["region"]] == ["none", "other"]
    web = doc["dimensions"]["lead_source"][0]
    assert (web["deals"], web["win_rate"], web["avg_deal_size"], web["avg_sales_cycle_seconds"]) == (
        4.0, 0.5, 500.0, 86400.0)
    assert [s["conversion_to_next"] for s in web["stages"]] == [0.75, 0.0, None, None]
    assert not validator("kpi-snapshot.v1.json").is_valid({**doc, "dimensions": {"region": [{"value": "x"}]}})
