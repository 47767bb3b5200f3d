"""Forecast categories (issue 23, item 6): funnel_forecast_value from the open-deals scan, the
stage mapping's config gauge, and the snapshot's forecast by category (docs/kpis.md, "Forecast
categories")."""

from __future__ import annotations

import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from models.config import DEFAULT_CONFIG, FORECAST_CATEGORIES, Clock, FunnelConfig
from models.forecast import forecast_by_category, rollups
from models.kpis import Samples, parse_exposition, total
from models.snapshot import build_snapshot
from processors.clock import EventClock
from processors.deals import DealProcessor
from processors.records import Record
from sinks.config_gauges import CONFIG_METRICS
from sinks.prometheus import KpiCollector

# Open stages' categories for deals whose CRM gives none: lead and mql keep the default.
MAPPING = {"default": {"opportunity": "commit", "sql": "best_case"}}
CONFIG = FunnelConfig.model_validate(
    {**yaml.safe_load(DEFAULT_CONFIG.read_text()), "forecast_categories": MAPPING})


def _event(i: int, when: str, crm: str | None = None, **change) -> bytes:
    properties = {} if crm is None else {"properties": {"forecast_category": crm}}
    return orjson.dumps({"event_id": f"e{i}", "deal_id": f"d{i}", "occurred_at": when,
                         **change, **properties})


# The clock ends on 2024-05-16 (stream clock): month = May, quarter = Q2, year = 2024.
EVENTS = [
    _event(1, "2024-05-10T00:00:00Z", stage="won", amount=300.0),  # won this month
    # stage mapping: opportunity → commit, sql → best_case
    _event(2, "2024-05-02T00:00:00Z", stage="opportunity", amount=1000.0,
           expected_close_at="2024-05-25T00:00:00Z"),
    _event(3, "2024-05-03T00:00:00Z", stage="sql", amount=200.0,
           expected_close_at="2024-06-10T00:00:00Z"),  # June: quarter and year, not month
    # the CRM's category wins over the stage's, whatever its case and spelling
    _event(4, "2024-05-04T00:00:00Z", "COMMIT", stage="lead", amount=400.0,
           expected_close_at="2024-05-20T00:00:00Z"),
    _event(5, "2024-05-05T00:00:00Z", "Omitted", stage="opportunity", amount=700.0,
           expected_close_at="2024-05-28T00:00:00Z"),
    _event(6, "2024-05-06T00:00:00Z", "Pipeline", stage="mql", amount=50.0,
           expected_close_at="2024-09-01T00:00:00Z"),  # next quarter: year only
    # an unknown CRM category (Salesforce's Most Likely) falls back to the stage's
    _event(7, "2024-05-07T00:00:00Z", "Most Likely", stage="sql", amount=80.0,
           expected_close_at="2024-05-30T00:00:00Z"),
    _event(8, "2024-05-08T00:00:00Z", "Best Case", stage="opportunity", amount=999.0),  # no date
    _event(9, "2024-05-09T00:00:00Z", "best_case", stage="opportunity", amount=60.0,
           currency="EUR", expected_close_at="2024-05-22T00:00:00Z"),  # a currency not configured
    _event(10, "2024-04-01T00:00:00Z", stage="opportunity", amount=5000.0,
           expected_close_at="2024-04-30T00:00:00Z"),  # last month: quarter and year
    _event(11, "2024-05-16T00:00:00Z", stage="lead"),  # moves the clock
]
# (category, currency, period) → amount
EXPECTED = {
    ("commit", "USD", "month"): 1400, ("commit", "USD", "quarter"): 6400, ("commit", "USD", "year"): 6400,
    ("best_case", "USD", "month"): 80, ("best_case", "USD", "quarter"): 280,
    ("best_case", "USD", "year"): 280,
    ("omitted", "USD", "month"): 700, ("omitted", "USD", "quarter"): 700, ("omitted", "USD", "year"): 700,
    ("pipeline", "USD", "year"): 50,
    ("best_case", "EUR", "month"): 60, ("best_case", "EUR", "quarter"): 60, ("best_case", "EUR", "year"): 60,
}


@pytest.fixture(scope="module")
def samples() -> Samples:
    registry = CollectorRegistry()
    clock = EventClock(Clock.STREAM)
    proc = DealProcessor(CONFIG, clock, max_skew_ms=86_400_000)
    registry.register(KpiCollector(CONFIG, lambda: list(proc.folds.folds.values()), clock.now_ms, "t"))
    batch = proc.process([Record(None, raw, "crm.events", 0, i) for i, raw in enumerate(EVENTS)], {}.get)
    assert not batch.rejections
    return parse_exposition(generate_latest(registry).decode())


def rows(samples: Samples, pipeline: str = "default") -> dict[tuple[str, str, str], float]:
    return {(labels["category"], labels["currency"], labels["period"]): value
            for labels, value in samples["funnel_forecast_value"] if labels["pipeline"] == pipeline}


def test_open_amounts_closing_in_the_period_per_category(samples):
    got = rows(samples)
    assert {key: value for key, value in got.items() if value} == EXPECTED


def test_every_category_currency_and_period_is_exported_zero_included(samples):
    periods = ("month", "quarter", "year")
    assert set(rows(samples, "lifecycle")) == {
        (category, "USD", period) for category in FORECAST_CATEGORIES for period in periods}
    assert set(rows(samples)) == {(category, currency, period) for category in FORECAST_CATEGORIES
                                  for currency in ("EUR", "USD") for period in periods}


def test_categories_add_up_to_the_open_value_closing_in_the_period(samples):
    for currency in ("USD", "EUR"):
        for period in ("month", "quarter", "year"):
            match = {"pipeline": "default", "currency": currency, "period": period}
            assert total(samples, "funnel_forecast_value", **match) == pytest.approx(
                total(samples, "funnel_open_value_period", **match))


def test_closed_adds_the_won_revenue_of_the_period_and_the_roll_ups_add_categories(samples):
    month = forecast_by_category(samples, "default", "USD", "month")
    assert month == {"pipeline": 0, "best_case": 80, "commit": 1400, "closed": 300, "omitted": 700}
    assert rollups(month) == {"commit": 1700, "best_case": 1780}
    assert forecast_by_category(samples, "default", "EUR", "month")["best_case"] == 60
    assert forecast_by_category({}, "default", "USD", "month") is None


def test_the_snapshot_carries_the_forecast_per_period(samples):
    snapshot = build_snapshot(samples, CONFIG, "default", as_of_ms=0, generated_ms=0, generation=1,
                              sequence=1, partitions=1, top_customers=[])
    body = snapshot.model_dump()
    assert set(body["forecast"]) == {"month", "quarter", "year"}
    assert body["forecast"]["quarter"] == {
        "categories": {"pipeline": 0, "best_case": 280, "commit": 6400, "closed": 300, "omitted": 700},
        "commit": 6700, "best_case": 6980}
    without = {name: values for name, values in samples.items() if name != "funnel_forecast_value"}
    old = build_snapshot(without, CONFIG, "default", as_of_ms=0, generated_ms=0, generation=1,
                         sequence=1, partitions=1, top_customers=[])
    assert "forecast" not in old.model_dump()  # optional: a snapshot without it stays valid


def test_the_stage_mapping_is_a_config_gauge(samples):
    assert "funnel_stage_forecast_category" in CONFIG_METRICS
    mapping = {(labels["pipeline"], labels["stage"]): labels["category"]
               for labels, value in samples["funnel_stage_forecast_category"] if value == 1}
    assert {stage: category for (pl, stage), category in mapping.items() if pl == "default"} == {
        "lead": "pipeline", "mql": "pipeline", "sql": "best_case", "opportunity": "commit",
        "won": "closed", "lost": "omitted"}
    assert mapping[("lifecycle", "opportunity")] == "pipeline"
