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
from streams.tools.dataset import dataset_events

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
