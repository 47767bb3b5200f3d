"""Issue 23 end to end: the dataset replayed with its six dimensions (sector, office location,
product, series, manager, regional office), managers as teams and deals in three currencies
with a rates table made for the test, with duplicates, reordered, and a worker killed
mid-replay: every KPI per dimension value, per team and in the reporting currency equals the
same KPI computed in batch straight from the CSV files, exactly."""

from __future__ import annotations

import csv
import random
from datetime import date

import pytest
import yaml

from models.config import DEFAULT_CONFIG
from models.deal import normalised
from models.kpis import total
from streams.tools.dataset import dataset_deals

from .conftest import (
    DATASET,
    DATASET_DIMENSIONS,
    exported_once,
    merged,
    team_config,
    wait_until,
)
from .test_e2e_pipeline import replay
from .test_reporting_e2e import RATES, currency_of
from .test_reporting_e2e import batch as reporting_batch

pytestmark = pytest.mark.broker

DAY_SECONDS = 86_400
OPEN_STAGES = ("lead", "mql", "sql", "opportunity")
STAGE_OF = {"Prospecting": "sql", "Engaging": "opportunity"}  # the csv stage map's open stages


def batch_kpis() -> dict[tuple, float]:
    """(metric, dimension, value, label) → value, from the CSV files alone: the per-value KPI
    gauges a worker exports, the rows that are 0 left out."""
    tables = {}
    for name, key in (("accounts.csv", "account"), ("products.csv", "product"),
                      ("sales_teams.csv", "sales_agent")):
        with (DATASET / name).open(newline="", encoding="utf-8") as f:
            tables[name] = {row[key]: row for row in csv.DictReader(f)}
    out: dict[tuple, float] = {}

    def add(key: tuple, value: float) -> None:
        out[key] = out.get(key, 0) + value

    with (DATASET / "sales_pipeline.csv").open(newline="", encoding="utf-8") as f:
        for index, row in enumerate(csv.DictReader(f)):
            currency = currency_of(index)
            product = {"GTXPro": "GTX Pro"}.get(row["product"], row["product"])
            joined = {**tables["accounts.csv"].get(row["account"], {}),
                      **tables["products.csv"][product],
                      **tables["sales_teams.csv"][row["sales_agent"]], **row, "product": product}
            stage = row["deal_stage"]
            for dimension, column in DATASET_DIMENSIONS.items():
                value = normalised(joined.get(column) or None) or "none"
                at = (dimension, value)
                reached = OPEN_STAGES[:3] if stage == "Prospecting" else OPEN_STAGES
                for name in reached:
                    add(("funnel_dimension_deals_reached", *at, name), 1)
                if stage in STAGE_OF:
                    add(("funnel_dimension_deals_open", *at, STAGE_OF[stage]), 1)
                    add(("funnel_dimension_open_value", *at, STAGE_OF[stage], currency),
                        float(joined["sales_price"]))
                    continue
                outcome = stage.lower()
                cycle = (date.fromisoformat(row["close_date"])
                         - date.fromisoformat(row["engage_date"])).days * DAY_SECONDS
                add(("funnel_dimension_deals_closed", *at, outcome, currency), 1)
                add(("funnel_dimension_time_to_close_seconds", *at, outcome), cycle)
                if outcome == "won":
                    add(("funnel_dimension_won_revenue", *at, currency), float(row["close_value"] or 0))
    return {key: value for key, value in out.items() if value}


LABELS_OF = {"funnel_dimension_deals_reached": ("stage",), "funnel_dimension_deals_open": ("stage",),
             "funnel_dimension_open_value": ("stage", "currency"),
             "funnel_dimension_deals_closed": ("outcome", "currency"),
             "funnel_dimension_time_to_close_seconds": ("outcome",),
             "funnel_dimension_won_revenue": ("currency",)}


def streamed_kpis(samples) -> dict[tuple, float]:
    """The same keys from the workers' summed samples (pipeline default)."""
    out: dict[tuple, float] = {}
    for metric, names in LABELS_OF.items():
        for labels, value in samples.get(metric, []):
            if labels["pipeline"] == "default":
                key = (metric, labels["dimension"], labels["value"], *(labels[n] for n in names))
                out[key] = out.get(key, 0) + value
    return {key: round(value, 6) for key, value in out.items() if value}


def hostile_order(seed: int = 23) -> list[dict]:
    """Every event of the dataset with its dimensions and the test's currencies, shuffled
    across and within deals (a close may come before its deal's entry), and one in ten sent
    twice."""
    events = [{**event, "currency": currency_of(index)} if "currency" in event else event
              for index, deal in enumerate(dataset_deals(DATASET, dimensions=DATASET_DIMENSIONS))
              for event in deal]
    rng = random.Random(seed)
    events += rng.sample(events, len(events) // 10)
    rng.shuffle(events)
    return events


def test_dimensions_and_teams_equal_the_batch_figures_under_duplicates_reordering_and_a_kill(
        broker, workers, tmp_path):
    config = str(team_config(tmp_path / "funnel.yaml"))  # reporting currency USD, rates.csv
    (tmp_path / "rates.csv").write_text("date,currency,rate\n" + "".join(
        f"{since},{currency},{value}\n" for currency, rows in RATES.items() for since, value in rows))
    batch = {key: round(value, 6) for key, value in batch_kpis().items()}
    reporting = reporting_batch()
    events = hostile_order()
    half = len(events) // 2
    first = workers("w1", FUNNEL_CLOCK="stream", FUNNEL_CONFIG=config)
    first.wait_ready()
    replay(broker, events[:half])
    wait_until(lambda: total(first.samples() or {}, "funnel_events_total") >= half // 2, 60,
               what="the first worker busy with the replay")
    first.kill()  # mid-replay: some batches written and not committed, some not written
    second = workers("w2", FUNNEL_CLOCK="stream", FUNNEL_CONFIG=config)
    replay(broker, events[half:])

    def converged():
        samples = second.samples()
        if not samples or not exported_once(merged([samples])):
            return None
        return samples if streamed_kpis(samples) == batch else None

    samples = wait_until(converged, 180, what="per-dimension KPIs equal to the batch figures",
                         show=lambda: _difference(streamed_kpis(second.samples() or {}), batch))
    values = {(labels["dimension"], labels["value"]) for labels, _ in
              samples["funnel_dimension_deals_reached"]}
    assert {dim for dim, _ in values} == set(DATASET_DIMENSIONS)
    assert ("sector", "none") in values  # prospecting deals have no account, so no sector
    assert all(value == 0 for _, value in samples["funnel_dimension_values_folded"])
    usd = {"pipeline": "default", "currency": "USD"}
    assert total(samples, "funnel_reporting_won_revenue", **usd) == float(reporting["won"]["all"])
    for stage, value in reporting["open"].items():
        assert total(samples, "funnel_reporting_open_value", stage=stage, **usd) == float(value)
    assert team_revenue(samples, "funnel_reporting_rep_won_revenue", "USD") == pytest.approx(
        {team: float(value) for team, value in reporting["team"].items()}, rel=1e-12)
    assert not [value for _, value in samples["funnel_reporting_unconverted_value"] if value]


def team_revenue(samples, metric: str, currency: str) -> dict[str, float]:
    """Won revenue per team in ``currency``: each rep's under the team funnel_owner_info gives
    (``none`` for reps the owners map does not list)."""
    team_of = {labels["owner"]: labels["team"] for labels, _ in samples["funnel_owner_info"]}
    out: dict[str, float] = {}
    for labels, value in samples[metric]:
        if labels["pipeline"] == "default" and labels["currency"] == currency and value:
            team = team_of.get(labels["owner"], "none")
            out[team] = out.get(team, 0) + value
    return out


def _difference(streamed: dict, batch: dict) -> str:
    keys = sorted(set(streamed) | set(batch))
    wrong = [(key, streamed.get(key), batch.get(key)) for key in keys
             if streamed.get(key) != batch.get(key)]
    return f"{len(wrong)} keys differ, e.g. {wrong[:5]}"


def test_a_burst_of_ten_thousand_values_keeps_the_worker_within_its_series_budget(
        broker, workers, tmp_path):
    """The cardinality test on a real worker: 10,000 deals, each with a distinct lead source
    but a few common ones. /metrics stays within the series budget, the common values are
    kept, ``other`` holds the rest and every KPI summed over the values equals its total."""
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config = tmp_path / "funnel.yaml"
    config.write_text(yaml.safe_dump({**shipped, "dimension_series_budget": 2_000,
                                      "dimensions": {"lead_source": {"max_values": 1_000}}}))
    events = []
    for i in range(10_000):
        source = f"Campaign {i}" if i % 4 else ("Referral", "Web", "Event")[i % 3]
        events.append({"event_id": f"burst:{i}", "deal_id": f"burst:{i}", "source": "api",
                       "occurred_at": "2024-05-01T10:00:00Z", "amount": float(i % 90),
                       "stage": ("lead", "sql", "won", "lost")[i % 4] if i % 7 else "mql",
                       "properties": {"lead_source": source}})
    worker = workers("w1", FUNNEL_CONFIG=str(config))
    worker.wait_ready()
    replay(broker, events)
    samples = wait_until(lambda: (s := worker.samples()) and total(s, "funnel_events_total") >= 10_000
                         and exported_once(merged([s])) and s, 120, what="10,000 events counted")
    series = sum(len(samples.get(name, [])) for name in LABELS_OF)
    assert series == total(samples, "funnel_dimension_series") <= 2_000
    values = {labels["value"] for labels, _ in samples["funnel_dimension_deals_open"]
              if labels["pipeline"] == "default"}
    assert {"referral", "web", "event", "none", "other"} <= values
    limit = total(samples, "funnel_dimension_values_limit", pipeline="default")
    assert len(values) == limit + 2 < 1_000  # the budget, not max_values, set the limit
    assert total(samples, "funnel_dimension_values_folded", pipeline="default") == (
        total(samples, "funnel_dimension_values", pipeline="default") - limit)
    for metric, totals, label in [
            ("funnel_dimension_deals_open", "funnel_deals_open", "stage"),
            ("funnel_dimension_deals_reached", "funnel_deals_reached", "stage"),
            ("funnel_dimension_won_revenue", "funnel_won_revenue", "currency")]:
        for key in {labels[label] for labels, _ in samples[totals]}:
            assert total(samples, metric, pipeline="default", **{label: key}) == pytest.approx(
                total(samples, totals, pipeline="default", **{label: key})), (metric, key)
    for outcome in ("won", "lost"):
        assert total(samples, "funnel_dimension_deals_closed", pipeline="default",
                     outcome=outcome) == total(samples, "funnel_deals_closed", pipeline="default",
                                               outcome=outcome)
