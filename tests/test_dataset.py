"""The dataset replayed through the state machine equals a plain batch computation of the CSV
and the literal values of the core issue."""

import csv
from collections import defaultdict
from datetime import date
from pathlib import Path

import pytest

from models import aggregates as agg
from models.config import load_config
from models.deal import Deal, apply_change
from models.event import decode_event, encode_event
from models.fold import Fold
from streams.tools.dataset import dataset_deals, dataset_events, row_events

DATASET = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "crm-sales-opportunities"
CONFIG = load_config()


def batch_kpis():
    """Straight from the CSV with no knowledge of events or folds."""
    with open(DATASET / "products.csv") as f:
        prices = {r["product"]: float(r["sales_price"]) for r in csv.DictReader(f)}
    with open(DATASET / "sales_pipeline.csv") as f:
        rows = list(csv.DictReader(f))
    out = defaultdict(float)
    cycles, reps, accounts = [], defaultdict(float), defaultdict(float)
    for row in rows:
        stage = row["deal_stage"]
        price = prices[row["product"].replace("GTXPro", "GTX Pro")]
        if stage == "Prospecting":
            out["open_sql"] += 1
            out["value_sql"] += price
        elif stage == "Engaging":
            out["open_opportunity"] += 1
            out["value_opportunity"] += price
        elif stage == "Won":
            value = float(row["close_value"])
            out["won"] += 1
            out["revenue"] += value
            cycles.append((date.fromisoformat(row["close_date"])
                           - date.fromisoformat(row["engage_date"])).days)
            reps[row["sales_agent"]] += value
            accounts[row["account"]] += value
        else:
            out["lost"] += 1
    out["avg_cycle_days"] = sum(cycles) / len(cycles)
    out["customers"] = len(accounts)
    out["avg_clv"] = sum(accounts.values()) / len(accounts)
    return out, max(reps.items(), key=lambda kv: kv[1])


def streamed_fold():
    deals = {}
    for event in dataset_events(DATASET):
        change = decode_event(encode_event(event), now_ms=1_900_000_000_000, max_skew_ms=1)
        deal = deals.setdefault(change.deal_id, Deal(change.deal_id))
        apply_change(deal, change, CONFIG.map_stage(change.source, "default", change.stage),
                     stage_ignored=False)
    return Fold.of(agg.deal_contribution(d, CONFIG) for d in deals.values())


def test_batch_computation_gives_the_literal_values():
    kpis, top = batch_kpis()
    assert kpis["open_sql"] == 500 and kpis["open_opportunity"] == 1589
    assert kpis["value_sql"] == 1_073_986 and kpis["value_opportunity"] == 3_892_229
    assert kpis["won"] == 4238 and kpis["lost"] == 2473
    assert kpis["revenue"] == 10_005_534
    assert kpis["revenue"] / kpis["won"] == pytest.approx(2360.909, abs=1e-3)
    assert kpis["avg_cycle_days"] == pytest.approx(51.782, abs=1e-3)
    assert kpis["customers"] == 85 and kpis["avg_clv"] == pytest.approx(117_712.16, abs=1e-2)
    assert top == ("Darcel Schlecht", 1_153_214)


def test_streamed_fold_equals_batch():
    kpis, top = batch_kpis()
    fold = streamed_fold()
    c = fold.counters
    assert c[agg.OPEN] == {("default", "sql"): 500, ("default", "opportunity"): 1589}
    assert c[agg.OPEN_VALUE][("default", "sql", "USD")] == kpis["value_sql"] * agg.MICRO
    assert c[agg.OPEN_VALUE][("default", "opportunity", "USD")] == kpis["value_opportunity"] * agg.MICRO
    assert c[agg.CLOSED] == {("default", "won"): kpis["won"], ("default", "lost"): kpis["lost"]}
    assert c[agg.WON_REVENUE][("default", "USD")] == kpis["revenue"] * agg.MICRO
    cycle = fold.hists[agg.TIME_TO_CLOSE][("default", "won")]
    assert cycle.total / cycle.count / agg.DAY_MS == pytest.approx(kpis["avg_cycle_days"], abs=1e-9)
    best = max(c[agg.REP_WON].items(), key=lambda kv: kv[1])
    assert (best[0][1], best[1] / agg.MICRO) == top


def batch_rows() -> dict[str, dict[str, str]]:
    """Opportunity → its row joined by hand to its account, product and sales team."""
    tables = {}
    for name, key in (("accounts", "account"), ("products", "product"), ("sales_teams", "sales_agent")):
        with open(DATASET / f"{name}.csv") as f:
            tables[key] = {r[key]: r for r in csv.DictReader(f)}
    with open(DATASET / "sales_pipeline.csv") as f:
        rows = list(csv.DictReader(f))
    joined = {}
    for row in rows:
        product = row["product"].replace("GTXPro", "GTX Pro")
        joined[row["opportunity_id"]] = {**tables["account"].get(row["account"], {}),
                                         **tables["product"][product],
                                         **tables["sales_agent"][row["sales_agent"]], **row,
                                         "product": product}
    return joined


def test_no_dimensions_gives_no_properties():
    assert not any("properties" in event for event in dataset_events(DATASET))


def test_dimensions_come_from_the_joined_tables_on_each_deals_first_event():
    dimensions = {"region": "regional_office", "sector": "sector", "product": "product",
                  "series": "series", "manager": "manager", "size": "employees"}
    rows = batch_rows()
    deals = list(dataset_deals(DATASET, dimensions=dimensions))
    assert len(deals) == len(rows) == 8800
    for events in deals:
        first, *rest = events
        row = rows[first["deal_id"].removeprefix("csv:")]
        assert first["properties"] == {name: row[column] for name, column in dimensions.items()
                                       if row.get(column)}
        assert all("properties" not in event for event in rest)
    # A Prospecting deal without an account has no account columns, and GTXPro is GTX Pro.
    no_account = [e[0] for e in deals if "account" not in e[0]]
    assert no_account and all("sector" not in e["properties"] for e in no_account)
    products = {e[0]["properties"]["product"] for e in deals}
    assert "GTX Pro" in products and "GTXPro" not in products
    assert {e[0]["properties"]["region"] for e in deals} == {"Central", "East", "West"}


def test_an_unknown_column_is_refused_by_name():
    with pytest.raises(ValueError, match="no column 'region'"):
        next(dataset_deals(DATASET, dimensions={"region": "region"}))


def test_row_events_with_dimensions_only_adds_properties():
    row = {"opportunity_id": "X1", "sales_agent": "Ann", "product": "GTXPro", "account": "",
           "deal_stage": "Won", "engage_date": "2017-01-02", "close_date": "2017-02-03", "close_value": "10",
           "regional_office": "East", "sector": ""}
    plain = row_events(row, {"GTX Pro": 5.0})
    entry, close = row_events(row, {"GTX Pro": 5.0}, dimensions={"region": "regional_office",
                                                                 "sector": "sector"})
    assert entry == {**plain[0], "properties": {"region": "East"}} and close == plain[1]
