"""KPIs per dimension value in snapshots: sums first, then ratios; values ranked again after
summing partitions, the rest in `other`; money in the snapshot's currency only."""

import pytest

from models.config import FunnelConfig, load_config
from models.dimension_kpis import ValueSums, dimension_values, value_sums
from models.dimensions import keep_most
from models.snapshot import build_snapshot

STAGES = ["lead", "mql", "sql", "opportunity"]
P = {"pipeline": "default", "dimension": "region"}


def region(samples, limit=20):
    """The values of dimension region in pipeline default, amounts in USD."""
    return dimension_values(samples, "default", "USD", STAGES, {"region": limit})["region"]


def row(value, **labels):
    return {**P, "value": value, **labels}


def samples_of(*values):
    """Samples of whole values, as a partition would export them; ``values``: (value, open per
    stage, open value per stage in USD, reached per stage, closed (outcome, currency) → deals,
    won cycle seconds, won revenue per currency)."""
    out = {name: [] for name in (
        "funnel_dimension_deals_open", "funnel_dimension_open_value", "funnel_dimension_deals_reached",
        "funnel_dimension_deals_closed", "funnel_dimension_time_to_close_seconds",
        "funnel_dimension_won_revenue")}
    for value, opened, open_value, reached, closed, cycle, won in values:
        for stage in STAGES:
            out["funnel_dimension_deals_open"].append((row(value, stage=stage), opened.get(stage, 0)))
            out["funnel_dimension_open_value"].append(
                (row(value, stage=stage, currency="USD"), open_value.get(stage, 0)))
            out["funnel_dimension_deals_reached"].append((row(value, stage=stage), reached.get(stage, 0)))
        for (outcome, currency), deals in closed.items():
            out["funnel_dimension_deals_closed"].append(
                (row(value, outcome=outcome, currency=currency), deals))
        out["funnel_dimension_time_to_close_seconds"].append((row(value, outcome="won"), cycle))
        out["funnel_dimension_time_to_close_seconds"].append((row(value, outcome="lost"), 99.0))
        for currency, amount in won.items():
            out["funnel_dimension_won_revenue"].append((row(value, currency=currency), amount))
    return out


def merged(*partials):
    """Partitions' samples side by side (summing is the KPI functions' job)."""
    out = {}
    for samples in partials:
        for name, rows in samples.items():
            out.setdefault(name, []).extend(rows)
    return out


WEB = ("web", {"lead": 2, "sql": 1}, {"lead": 200.0, "sql": 50.0},
       {"lead": 10, "mql": 6, "sql": 4, "opportunity": 3},
       {("won", "USD"): 2, ("won", "EUR"): 1, ("lost", "USD"): 4}, 3 * 86400.0,
       {"USD": 1000.0, "EUR": 7000.0})


def test_a_values_kpis_divide_its_sums():
    [web, none, other] = region(samples_of(WEB))
    assert (web.value, none.value, other.value) == ("web", "none", "other")
    assert (web.deals, web.open_deals, web.won, web.lost) == (10, 3, 3, 4)
    assert web.win_rate == 3 / 7
    # money in the snapshot's currency: EUR revenue is left out, and so are the EUR deals from
    # the average deal size (their amounts are not in it); counts and the cycle span both
    assert (web.won_revenue, web.avg_deal_size, web.open_value) == (1000.0, 500.0, 250.0)
    assert web.avg_sales_cycle_seconds == 86400.0
    stages = {s.stage: s for s in web.stages}
    assert [s.stage for s in web.stages] == STAGES
    assert (stages["lead"].open, stages["lead"].open_value, stages["lead"].reached) == (2, 200.0, 10)
    assert [s.conversion_to_next for s in web.stages] == [0.6, 4 / 6, 0.75, None]


def test_ratios_without_a_denominator_are_null_never_zero():
    [none] = [v for v in region({}) if v.value == "none"]
    assert (none.deals, none.won, none.won_revenue) == (0, 0, 0)
    assert none.win_rate is none.avg_deal_size is none.avg_sales_cycle_seconds is None
    assert all(s.conversion_to_next is None for s in none.stages)


def test_partitions_are_summed_before_dividing_never_averaged():
    fast = ("web", {}, {}, {"lead": 1, "mql": 1}, {("won", "USD"): 1}, 10.0, {"USD": 100.0})
    slow = ("web", {}, {}, {"lead": 9, "mql": 0}, {("won", "USD"): 3, ("lost", "USD"): 6}, 90.0,
            {"USD": 300.0})
    [web, *_] = region(merged(samples_of(fast), samples_of(slow)))
    assert web.win_rate == 4 / 10                   # not (1/1 + 3/9) / 2
    assert web.avg_sales_cycle_seconds == 100 / 4   # not (10 + 30) / 2
    assert web.avg_deal_size == 100.0
    assert web.stages[0].conversion_to_next == 1 / 10


def test_values_are_ranked_again_and_the_rest_summed_in_other():
    """A value kept in one partition can be `other` in the next: after summing, at most
    `limit` values by deals, ties by name; `none` and `other` last; totals unchanged."""
    def deal(value, n):
        return (value, {"lead": n}, {"lead": 10.0 * n}, {"lead": n}, {}, 0.0, {})

    samples = merged(samples_of(deal("b", 3), deal("a", 3), deal("c", 5), deal("other", 1)),
                     samples_of(deal("none", 2), deal("d", 1), deal("gone", 0)))
    rows = region(samples, limit=2)
    assert [(r.value, r.deals, r.open_value) for r in rows] == [
        ("c", 5, 50.0), ("a", 3, 30.0), ("none", 2, 20.0), ("other", 5, 50.0)]
    assert sum(r.deals for r in rows) == 3 + 3 + 5 + 1 + 2 + 1
    # the folding sums a copy: the summed values themselves are left as they were
    sums = value_sums(samples, "default", ["region"], "USD")["region"]
    keep_most(sums, 0, ValueSums)
    assert sums["other"].deals == 1


def test_other_pipelines_dimensions_currencies_and_guard_gauges_are_not_read():
    samples = samples_of(WEB)
    samples["funnel_dimension_deals_open"] += [
        ({**row("web", stage="lead"), "pipeline": "lifecycle"}, 50),
        ({**row("web", stage="lead"), "dimension": "sector"}, 50)]
    samples["funnel_dimension_open_value"].append((row("web", stage="lead", currency="EUR"), 1e6))
    samples["funnel_dimension_values"] = [({**P}, 1e6)]
    samples["funnel_dimension_values_folded"] = [({**P}, 1e6)]
    assert region(samples) == region(samples_of(WEB))


@pytest.mark.parametrize("dimensions", [{}, {"region": {}, "sector": {"max_values": 1}}])
def test_snapshots_carry_dimensions_in_config_order_only_when_named(dimensions):
    config = FunnelConfig.model_validate({**load_config().model_dump(), "dimensions": dimensions})
    snapshot = build_snapshot(samples_of(WEB), config, "default", as_of_ms=0, generated_ms=0,
                              generation=1, sequence=1, partitions=1, top_customers=[])
    if not dimensions:
        assert snapshot.dimensions is None and "dimensions" not in snapshot.model_dump()
        return
    assert list(snapshot.dimensions) == ["region", "sector"]
    assert [v.value for v in snapshot.dimensions["region"]] == ["web", "none", "other"]
    assert [v.value for v in snapshot.dimensions["sector"]] == ["none", "other"]  # no samples yet
    assert snapshot.dimensions["region"][0].won_revenue == 1000.0  # USD: the config's currency
