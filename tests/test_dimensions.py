"""KPIs per dimension value and the cardinality guard (issue 23, items 1–3), without a broker.

What the worker exports per value must add up, over the values, to the funnel's totals — the
guard only sums — and never take more series than the budget, however many values arrive.
"""

from __future__ import annotations

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from models import aggregates as agg
from models.aggregates import deal_contribution, pack_dimension, unpack_dimension
from models.config import ConfigError, FunnelConfig, load_config
from models.deal import Deal, apply_change, normalised
from models.dimensions import OTHER, dimension_kpis
from models.event import Change
from models.fold import Fold
from sinks.prometheus import KpiCollector

SHIPPED = load_config()
T0 = 1_700_000_000_000
DAY = 86_400_000


def config(**dimensions) -> FunnelConfig:
    return FunnelConfig.model_validate({**SHIPPED.model_dump(), "dimensions": dimensions})


def deal(config_, deal_id, steps, **fields) -> Deal:
    """A deal through ``steps`` = [(day, stage)], its first event carrying ``fields``."""
    state = Deal(deal_id, 0)
    for i, (day, stage) in enumerate(steps):
        extra = fields if i == 0 else {}
        apply_change(state, Change(f"{deal_id}:{i}", T0 + day * DAY, deal_id, stage=stage, **extra),
                     stage, stage_ignored=False, keep=config_.dimension_names)
    return state


def samples(config_, deals) -> dict[str, list[tuple[dict, float]]]:
    fold = Fold.of(deal_contribution(d, config_) for d in deals)
    registry = CollectorRegistry()
    registry.register(KpiCollector(config_, lambda: [fold], lambda: T0 + 400 * DAY, "test"))
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def summed(rows, by: str, **match) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in rows:
        if all(labels.get(k) == v for k, v in match.items()):
            out[labels[by]] = out.get(labels[by], 0) + value
    return out


def nonzero(values: dict[str, float]) -> dict[str, float]:
    """Zero rows dropped: a value exports every currency of its dimension, zeros included."""
    return {key: value for key, value in values.items() if value}


def test_values_are_normalised_case_and_whitespace_and_blank_is_none():
    assert normalised("  North   America ") == normalised("north america") == "north america"
    assert normalised("ÉNERGIE") == "énergie"
    assert normalised("   ") is None and normalised(None) is None


def test_packed_sums_add_and_subtract_like_their_parts():
    a, b = pack_dimension(1, 5 * DAY, 10**12), pack_dimension(3, 0, 7)
    assert unpack_dimension(a + b) == (4, 5 * DAY, 10**12 + 7)
    assert unpack_dimension(a + b - a) == (3, 0, 7)


def test_each_kpi_per_value_from_a_few_deals():
    cfg = config(region={})
    deals = [
        deal(cfg, "a", [(0, "lead"), (3, "sql"), (10, "won")], amount=100.0, properties={"region": "EMEA"}),
        deal(cfg, "b", [(0, "lead"), (4, "lost")], amount=50.0, properties={"region": " emea"}),
        deal(cfg, "c", [(0, "mql")], amount=70.0, currency="EUR", properties={"region": "APAC"}),
        deal(cfg, "d", [(0, "lead"), (2, "won")], amount=30.0),  # no value: none
    ]
    kpis = dimension_kpis(cfg, Fold.of(deal_contribution(d, cfg) for d in deals)
                          .counters[agg.DIMENSION])[("default", "region")]
    emea, apac, none = kpis.values["emea"], kpis.values["apac"], kpis.values["none"]
    assert list(kpis.values) == ["emea", "apac", "none", OTHER]  # most deals first
    assert emea.closed == {("won", "USD"): 1, ("lost", "USD"): 1}
    assert emea.won == {"USD": 100 * agg.MICRO} and emea.cycle_ms == {"won": 10 * DAY, "lost": 4 * DAY}
    assert emea.reached(cfg.pipelines["default"]) == {"lead": 2, "mql": 1, "sql": 1, "opportunity": 1}
    assert apac.open == {"mql": 1} and apac.open_value == {("mql", "EUR"): 70 * agg.MICRO}
    assert none.won == {"USD": 30 * agg.MICRO} and kpis.currencies == ["EUR", "USD"]
    assert kpis.distinct == 2 and kpis.folded == 0


def test_a_property_change_moves_the_deal_to_its_new_value_and_a_clear_to_none():
    cfg = config(region={})
    state = deal(cfg, "a", [(0, "lead")], properties={"region": "EMEA"})
    apply_change(state, Change("late", T0 + DAY, "a", properties={"region": "APAC"}), None,
                 stage_ignored=False, keep=cfg.dimension_names)
    apply_change(state, Change("older", T0 + DAY // 2, "a", properties={"region": "AMER"}), None,
                 stage_ignored=False, keep=cfg.dimension_names)  # older than APAC: stale
    rows = samples(cfg, [state])["funnel_dimension_deals_open"]
    assert summed(rows, "value", stage="lead") == {"apac": 1, "none": 0, OTHER: 0}
    apply_change(state, Change("clear", T0 + 2 * DAY, "a", properties={"region": None}), None,
                 stage_ignored=False, keep=cfg.dimension_names)
    rows = samples(cfg, [state])["funnel_dimension_deals_open"]
    assert summed(rows, "value", stage="lead") == {"none": 1, OTHER: 0}


def test_ten_thousand_distinct_values_stay_within_the_budget_and_sum_to_the_totals():
    """The cardinality test: a burst of 10,000 distinct values of one dimension. The exported
    values are the most frequent ones up to max_values, the rest are in ``other``, and every
    KPI summed over the values equals the funnel's total."""
    cfg = config(lead_source={"max_values": 25}, region={})
    deals = []
    for i in range(10_000):
        stage = ("lead", "mql", "won", "lost")[i % 4]
        steps = [(0, "lead")] + ([(i % 50 + 1, stage)] if stage != "lead" else [])
        source = f"popular-{i % 5}" if i % 3 == 0 else f"junk value {i}"
        deals.append(deal(cfg, f"d{i}", steps, amount=float(i % 97), currency=("USD", "EUR")[i % 2],
                          properties={"lead_source": source, "region": ("emea", "apac")[i % 2]}))
    out = samples(cfg, deals)
    series = sum(len(rows) for name, rows in out.items()
                 if name.startswith("funnel_dimension_") and name not in (
                     "funnel_dimension_values", "funnel_dimension_values_folded",
                     "funnel_dimension_values_limit", "funnel_dimension_fleet_ranking",
                     "funnel_dimension_series", "funnel_dimension_series_budget"))
    assert series == out["funnel_dimension_series"][0][1] <= cfg.dimension_series_budget
    by_source = summed(out["funnel_dimension_deals_open"], "value", dimension="lead_source",
                       pipeline="default")
    assert len(by_source) == 25 + 2 and {"none", OTHER} <= set(by_source)
    assert {f"popular-{i}" for i in range(5)} <= set(by_source)  # the most deals are kept
    guard = {(labels["dimension"], name): value for name in ("funnel_dimension_values",
                                                             "funnel_dimension_values_folded")
             for labels, value in out[name] if labels["pipeline"] == "default"}
    junk = sum(1 for i in range(10_000) if i % 3)
    assert guard == {("lead_source", "funnel_dimension_values"): 5 + junk,
                     ("lead_source", "funnel_dimension_values_folded"): 5 + junk - 25,
                     ("region", "funnel_dimension_values"): 2,
                     ("region", "funnel_dimension_values_folded"): 0}
    # Sums over values = totals, for every KPI and label combination.
    for dim_metric, total_metric, by in [
        ("funnel_dimension_deals_open", "funnel_deals_open", "stage"),
        ("funnel_dimension_deals_reached", "funnel_deals_reached", "stage"),
        ("funnel_dimension_won_revenue", "funnel_won_revenue", "currency"),
    ]:
        for dimension in ("lead_source", "region"):
            got = summed(out[dim_metric], by, dimension=dimension, pipeline="default")
            want = summed(out[total_metric], by, pipeline="default")
            assert nonzero(got) == pytest.approx(nonzero(want)), (dim_metric, dimension)
    for dimension in ("lead_source", "region"):
        closed = summed(out["funnel_dimension_deals_closed"], "outcome", dimension=dimension,
                        pipeline="default")
        assert closed == summed(out["funnel_deals_closed"], "outcome", pipeline="default")
        cycle = summed(out["funnel_dimension_time_to_close_seconds"], "outcome",
                       dimension=dimension, pipeline="default")
        assert cycle == pytest.approx(summed(out["funnel_time_to_close_seconds_gsum"], "outcome",
                                             pipeline="default"))


def test_the_budget_lowers_the_limit_when_values_take_many_series():
    """With many currencies each value takes more series: fewer values are kept, never more
    series than the budget."""
    cfg = FunnelConfig.model_validate({**SHIPPED.model_dump(), "dimension_series_budget": 2_000,
                                       "dimensions": {"region": {"max_values": 1000}}})
    currencies = [f"C{a}{b}" for a in "ABCDEFGH" for b in "ABCDE"]  # 40
    deals = [deal(cfg, f"d{i}", [(0, "lead")], amount=1.0, currency=currencies[i % 40],
                  properties={"region": f"r{i % 300}"}) for i in range(1200)]
    out = samples(cfg, deals)
    limit = {labels["pipeline"]: value for labels, value in out["funnel_dimension_values_limit"]}
    assert limit["default"] < 1000
    assert out["funnel_dimension_series"][0][1] <= 2_000
    assert sum(summed(out["funnel_dimension_deals_open"], "value", pipeline="default",
                      dimension="region").values()) == 1200


def test_dimension_config_mistakes_are_one_clear_line(tmp_path):
    path = tmp_path / "funnel.yaml"
    doc = SHIPPED.model_dump(mode="json")
    path.write_text(yaml.safe_dump({**doc, "dimensions": {"Lead Source": {}}}))
    with pytest.raises(ConfigError, match=r"Lead Source.*lower case"):
        load_config(path)
    path.write_text(yaml.safe_dump({**doc, "dimension_series_budget": 100,
                                    "dimensions": {f"d{i}": {} for i in range(8)}}))
    with pytest.raises(ConfigError, match="dimension_series_budget 100 is too small"):
        load_config(path)
    path.write_text(yaml.safe_dump({**doc, "dimensions": {"region": {"sources": {"hubspot": " "}}}}))
    with pytest.raises(ConfigError, match="hubspot: the property name"):
        load_config(path)
