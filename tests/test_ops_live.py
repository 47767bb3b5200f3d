"""End-to-end: a real Prometheus 2.42 scrapes a real worker fed with the dataset replay.

The worker comes from the `live_metrics_url` fixture (tests/conftest.py): the /metrics URL of a
worker that has replayed ../shared/datasets/crm-sales-opportunities with the stream clock
(FUNNEL_CLOCK=stream, so the 7d/30d/90d windows and stalls are relative to 2017-12-31). This
module starts Prometheus with prometheus/rules/*.yml (tmp dir, free port, 1 s scrape and rule
interval), then through the HTTP API:

- every recording rule returns data;
- every query of every board panel returns data (the boards never pad with `or vector(0)`,
  tests/test_ops_dashboards.py);
- the headline rules and panels equal the literal dataset values of the core issue;
- the KPIs by dimension (the fixture's config names DATASET_DIMENSIONS, the replay carries the
  deals' values as event `properties`) equal the figures computed in batch from the CSV files,
  per value, and add up to the pipeline's totals over the values of each dimension.

With FUNNEL_WRITE_DASHBOARD_DOCS=1 it also rewrites docs/dashboards.md from this run.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from .conftest import (
    DATASET,
    DATASET_DIMENSIONS,
    LIVE_OWNER_NAMES,
    UNLISTED_MANAGER,
    batch_team_revenue,
    team_owners,
)

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "grafana" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lp = _load("live_prometheus")
RULES = lp.recording_rules()
BOARDS = lp.load_boards()
QUERIES = [
    pytest.param(board, panel, target, id=f"{board['uid']}/{panel['title']}/{target['refId']}")
    for board in BOARDS
    for panel, target in lp.board_targets(board)
]
DAY = 86400.0

# Literal values of the dataset replay (core issue acceptance; stalls: leaks issue).
WIN_RATE = 4238 / (4238 + 2473)  # 0.63150
WON_REVENUE = 10_005_534
AVG_DEAL_SIZE = 2_360.909
AVG_WON_CYCLE_DAYS = 51.782
CONVERSION_SQL_OPPORTUNITY = (1589 + 4238 + 2473) / 8800  # reached(opportunity) / reached(sql)
TOP_REP, TOP_REP_REVENUE = "Darcel Schlecht", 1_153_214
CUSTOMERS, AVG_LIFETIME_VALUE = 85, 117_712.16
OPEN_DEALS = {"sql": 500, "opportunity": 1589}
OPEN_VALUE = {"sql": 1_073_986, "opportunity": 3_892_229}
STALLED_OPPORTUNITIES = 1571


@pytest.fixture(scope="module")
def prom(live_metrics_url, tmp_path_factory):
    with lp.LivePrometheus(live_metrics_url, tmp_path_factory.mktemp("prometheus")) as p:
        p.wait_scraped()
        p.wait_rules(RULES)
        p.pin()
        yield p


@pytest.fixture(scope="module")
def variables(prom):
    pipelines = prom.label_values("pipeline", "funnel_deals_open")
    assert "default" in pipelines, f"pipeline variable query finds {pipelines}"
    dimensions = prom.label_values("dimension",
                                   'pipeline_dimension:funnel_dimension_values:max{pipeline="default"}')
    assert set(dimensions) == set(DATASET_DIMENSIONS), f"dimension variable query finds {dimensions}"
    # the dimension board: one dimension, every value (All), one currency; the revenue board's
    # forecast by category: one period (and the same currency)
    return {"pipeline": "default", "window": "30d", "dimension": "sector", "value": ".*", "currency": "USD",
            "period": "quarter"}


@pytest.mark.parametrize("rule", RULES)
def test_recording_rule_returns_data(prom, rule):
    assert prom.query(rule), f"{rule} returns no data"


@pytest.mark.parametrize(("board", "panel", "target"), QUERIES)
def test_dashboard_query_returns_data(prom, variables, board, panel, target):
    windows = ["7d", "30d", "90d"] if "$window" in target["expr"] else ["30d"]
    dimensions = sorted(DATASET_DIMENSIONS) if "$dimension" in target["expr"] else ["sector"]
    for window in windows:
        for dimension in dimensions:
            expr = lp.substitute(target["expr"], {**variables, "window": window, "dimension": dimension})
            assert prom.query(expr), f"no data for window={window}, dimension={dimension}:\n{expr}"


def test_the_kpis_are_current_and_not_held(prom):
    """Every partition exported once: the boards' held series are the exact ones, the as-of time
    is the last evaluation's, and the hold marker is absent (held during rebalances only:
    tests/test_board_routine_ops.py)."""
    assert prom.query(lp.HOLD_ONLY[0]) == []
    age = prom.value("time() - fleet:funnel_kpis_as_of:timestamp")
    assert 0 <= age < 5, f"KPIs as of {age:.1f} s ago at a 1 s evaluation interval"
    open_deals = 'pipeline:funnel_deals_open:sum{pipeline="default"}'
    assert prom.value(open_deals.replace(":sum{", ":sum_held{")) == prom.value(open_deals)


def _one(prom, expr: str) -> float:
    return prom.value(expr)


def test_headline_rules_equal_the_dataset(prom):
    sel = '{pipeline="default"}'
    assert _one(prom, f"pipeline:funnel_win_rate:ratio{sel}") == pytest.approx(WIN_RATE, abs=5e-6)
    assert round(_one(prom, f"pipeline:funnel_win_rate:ratio{sel}"), 5) == 0.63150
    assert _one(prom, f"sum(pipeline_currency:funnel_won_revenue:sum{sel})") == WON_REVENUE
    assert _one(prom, f"pipeline_currency:funnel_won_deal_value:avg{sel}") == pytest.approx(
        AVG_DEAL_SIZE, abs=5e-4
    )
    cycle = _one(prom, 'pipeline_outcome:funnel_time_to_close_seconds:avg{pipeline="default", outcome="won"}')
    assert cycle / DAY == pytest.approx(AVG_WON_CYCLE_DAYS, abs=5e-4)
    conversion = _one(
        prom,
        "pipeline_stage:funnel_stage_conversion:ratio"
        '{pipeline="default", stage="sql", next_stage="opportunity"}',
    )
    assert conversion == pytest.approx(CONVERSION_SQL_OPPORTUNITY, rel=1e-12)
    top = prom.query(f"topk(1, pipeline_owner_currency:funnel_rep_won_revenue:sum{sel})")
    assert top[0]["metric"]["owner"] == TOP_REP
    assert float(top[0]["value"][1]) == TOP_REP_REVENUE
    assert _one(prom, f"pipeline:funnel_customers:sum{sel}") == CUSTOMERS
    assert _one(prom, f"pipeline_currency:funnel_customer_lifetime_value:avg{sel}") == (
        pytest.approx(AVG_LIFETIME_VALUE, abs=5e-3)
    )
    for stage, n in OPEN_DEALS.items():
        assert _one(prom, f'pipeline_stage:funnel_deals_open:sum{{pipeline="default", stage="{stage}"}}') == n
        assert (
            _one(
                prom,
                f'sum(pipeline_stage_currency:funnel_open_value:sum{{pipeline="default", stage="{stage}"}})',
            )
            == OPEN_VALUE[stage]
        )
    assert _one(prom, f"pipeline:funnel_deals_open:sum{sel}") == sum(OPEN_DEALS.values())
    assert (
        _one(prom, 'pipeline_stage:funnel_deals_stalled:sum{pipeline="default", stage="opportunity"}')
        == STALLED_OPPORTUNITIES
    )


def _panel(board_uid: str, title: str) -> dict:
    board = next(b for b in BOARDS if b["uid"] == board_uid)
    return next(p for p, _ in lp.board_targets(board) if p["title"] == title)


def _panel_result(prom, variables, board_uid: str, title: str) -> list[dict]:
    (target,) = _panel(board_uid, title)["targets"]
    return prom.query(lp.substitute(target["expr"], variables))


def _panel_value(prom, variables, board_uid: str, title: str) -> float:
    result = _panel_result(prom, variables, board_uid, title)
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_headline_panels_show_the_dataset_values(prom, variables):
    v = variables
    assert round(_panel_value(prom, v, "funnel-overview", "Win rate (all time)"), 5) == 0.63150
    assert _panel_value(prom, v, "funnel-revenue", "Won revenue (all time)") == WON_REVENUE
    assert _panel_value(prom, v, "funnel-revenue", "Average deal size (all time)") == (
        pytest.approx(AVG_DEAL_SIZE, abs=5e-4)
    )
    cycle = _panel_value(prom, v, "funnel-velocity", "Average sales cycle (won, all time)")
    assert cycle / DAY == pytest.approx(AVG_WON_CYCLE_DAYS, abs=5e-4)
    assert _panel_value(prom, v, "funnel-revenue", "Customers") == CUSTOMERS
    assert _panel_value(prom, v, "funnel-revenue", "Customer lifetime value (average)") == (
        pytest.approx(AVG_LIFETIME_VALUE, abs=5e-3)
    )
    conversion = {
        (r["metric"]["stage"], r["metric"]["next_stage"]): float(r["value"][1])
        for r in _panel_result(prom, v, "funnel-overview", "Stage conversion (all time)")
    }
    assert conversion[("sql", "opportunity")] == pytest.approx(CONVERSION_SQL_OPPORTUNITY)
    board = _panel_result(prom, v, "funnel-revenue", "Sales leaderboard (top 10 reps)")
    assert len(board) == 10
    best = max(board, key=lambda r: float(r["value"][1]))
    assert (best["metric"]["owner"], float(best["value"][1])) == (TOP_REP, TOP_REP_REVENUE)
    stalled = {
        r["metric"]["stage"]: float(r["value"][1])
        for r in _panel_result(prom, v, "funnel-leaks", "Stalled deals by stage")
    }
    assert stalled["opportunity"] == STALLED_OPPORTUNITIES
    # the funnel bar gauge carries the stage position used to order its bars
    funnel = _panel_result(prom, v, "funnel-overview", "Funnel: deals that reached each stage")
    order = sorted(funnel, key=lambda r: int(r["metric"]["idx"]))
    values = [float(r["value"][1]) for r in order]
    assert values == sorted(values, reverse=True), "reached must not grow along the funnel"


def test_leaderboard_shows_each_rep_once_by_name_when_configured_else_by_id(prom, variables):
    """The live worker's config (conftest.team_owners) names the top rep LIVE_OWNER_NAMES says,
    the other listed reps by their own name, and leaves UNLISTED_MANAGER's reps out: those rows
    carry their owner id as `rep` and no name; no rep appears twice."""
    names = {owner: entry["name"] for owner, entry in team_owners().items()}
    board = _panel_result(prom, variables, "funnel-revenue", "Sales leaderboard (top 10 reps)")
    owners = [r["metric"]["owner"] for r in board]
    assert len(owners) == len(set(owners)) == 10
    top = prom.query('topk(10, pipeline_owner_currency:funnel_rep_won_revenue:sum{pipeline="default"})')
    assert set(owners) == {r["metric"]["owner"] for r in top}
    for row in board:
        owner, rep = row["metric"]["owner"], row["metric"]["rep"]
        assert rep == names.get(owner, owner), row
        assert row["metric"].get("name") == names.get(owner), row
    assert {r["metric"]["rep"] for r in board} >= {LIVE_OWNER_NAMES[TOP_REP]}
    assert [owner for owner in owners if owner not in names], "no unlisted rep in the top 10"


def test_team_won_revenue_equals_the_batch_figure_per_team(prom, variables):
    """Managers as teams (sales_teams.csv), UNLISTED_MANAGER's reps in team none: the recording
    rule, its held twin and the board's panel give each team the won revenue computed in batch
    from the CSV files, exactly."""
    expected = batch_team_revenue()
    assert "none" in expected and UNLISTED_MANAGER not in expected and len(expected) >= 5
    assert sum(expected.values()) == WON_REVENUE

    def per_team(result):
        assert all(r["metric"]["pipeline"] == "default" and r["metric"]["currency"] == "USD"
                   for r in result), result
        return {r["metric"]["team"]: float(r["value"][1]) for r in result}

    rule = 'pipeline_team_currency:funnel_team_won_revenue:sum{pipeline="default"}'
    assert per_team(prom.query(rule)) == expected
    assert per_team(prom.query(rule.replace(":sum{", ":sum_held{"))) == expected
    panel = _panel_result(prom, variables, "funnel-revenue", "Leaderboard by team")
    assert per_team(panel) == expected
    assert [float(r["value"][1]) for r in panel] == sorted(expected.values(), reverse=True)


# ------------------------------------------------------------------ KPIs by dimension
SERIES_PER_VALUE = 2 * 2 + 2 * 1 + 3 * 1 + 2  # 2·S + S·C + 3·C + 2: open stages sql, opportunity; USD
MAX_VALUES = 20  # the config's default: every dataset dimension has fewer values (nothing folded)


def batch_by_value(column: str) -> dict[str, dict[str, float]]:
    """Per value of a dataset column (normalised as the worker does; `none` without one), the
    dimension KPIs' inputs computed from the CSV files: deals won and lost, won revenue, won
    cycle seconds (engage_date → close_date), open deals and value per stage, reached."""
    from datetime import date

    from models.deal import normalised
    from streams.tools.dataset import joined_rows, load_prices

    prices = load_prices(DATASET)
    out: dict[str, dict[str, float]] = {}
    for row in joined_rows(DATASET):
        value = normalised(row.get(column) or None) or "none"
        k = out.setdefault(value, dict.fromkeys(
            ("won", "lost", "revenue", "cycle", "open_sql", "open_opportunity", "value_sql",
             "value_opportunity", "reached_sql", "reached_opportunity"), 0.0))
        stage = row["deal_stage"]
        k["reached_sql"] += 1  # Prospecting maps to sql, Engaging (every other row) to opportunity
        if stage != "Prospecting":
            k["reached_opportunity"] += 1
        if stage in ("Prospecting", "Engaging"):
            open_stage = "sql" if stage == "Prospecting" else "opportunity"
            k[f"open_{open_stage}"] += 1
            k[f"value_{open_stage}"] += prices[row["product"]]
        elif stage == "Won":
            k["won"] += 1
            k["revenue"] += float(row["close_value"] or 0)
            days = date.fromisoformat(row["close_date"]) - date.fromisoformat(row["engage_date"])
            k["cycle"] += days.days * DAY
        else:
            k["lost"] += 1
    return out


def _by_value(result: list[dict], *labels: str) -> dict:
    return {tuple(r["metric"][name] for name in ("value", *labels)) if labels else r["metric"]["value"]:
            float(r["value"][1]) for r in result}


@pytest.mark.parametrize("dimension", sorted(DATASET_DIMENSIONS))
def test_kpis_by_dimension_equal_the_batch_figures_per_value(prom, dimension):
    """Every value of every dataset dimension: the exact rules and their held twins give the
    batch figures (counts and sums exactly, ratios to float precision); nothing is folded."""
    batch = batch_by_value(DATASET_DIMENSIONS[dimension])
    sel = f'{{pipeline="default", dimension="{dimension}"}}'

    def rule(name: str, *labels: str) -> dict:
        exact = _by_value(prom.query(name + sel), *labels)
        assert _by_value(prom.query(name + "_held" + sel), *labels) == exact, name
        return exact

    closed = rule("pipeline_dimension_value_outcome:funnel_dimension_deals_closed:sum", "outcome")
    revenue = rule("pipeline_dimension_value_currency:funnel_dimension_won_revenue:sum", "currency")
    open_deals = rule("pipeline_dimension_value_stage:funnel_dimension_deals_open:sum", "stage")
    open_value = rule("pipeline_dimension_value_stage_currency:funnel_dimension_open_value:sum",
                      "stage", "currency")
    reached = rule("pipeline_dimension_value_stage:funnel_dimension_deals_reached:sum", "stage")
    win_rate = rule("pipeline_dimension_value:funnel_dimension_win_rate:ratio")
    size = rule("pipeline_dimension_value_currency:funnel_dimension_won_deal_value:avg", "currency")
    cycle = rule("pipeline_dimension_value_outcome:funnel_dimension_time_to_close_seconds:avg", "outcome")
    conversion = rule("pipeline_dimension_value_stage:funnel_dimension_stage_conversion:ratio", "stage")
    # exported: every value of the dataset, none (always, deals without one or not) and other
    # (always; 0 here: nothing folded)
    assert {v for v, _ in closed} == set(batch) | {"none", "other"}
    assert closed[("other", "won")] == closed[("other", "lost")] == 0
    for value, k in batch.items():
        assert closed[(value, "won")] == k["won"] and closed[(value, "lost")] == k["lost"], value
        assert revenue[(value, "USD")] == k["revenue"], value
        for stage in ("sql", "opportunity"):
            assert open_deals[(value, stage)] == k[f"open_{stage}"], (value, stage)
            assert open_value[(value, stage, "USD")] == pytest.approx(k[f"value_{stage}"], abs=1e-6)
            assert reached[(value, stage)] == k[f"reached_{stage}"], (value, stage)
        if k["won"] + k["lost"]:
            assert win_rate[value] == pytest.approx(k["won"] / (k["won"] + k["lost"]), rel=1e-12)
        else:
            assert value not in win_rate  # 0 / 0: no series, not NaN
        if k["won"]:
            assert size[(value, "USD")] == pytest.approx(k["revenue"] / k["won"], rel=1e-12)
            assert cycle[(value, "won")] == pytest.approx(k["cycle"] / k["won"], rel=1e-9)
        assert conversion[(value, "sql")] == pytest.approx(
            k["reached_opportunity"] / k["reached_sql"], rel=1e-12)
    # the guard: the distinct values (none not counted), none folded, max_values the limit
    guard = f'{{pipeline="default", dimension="{dimension}"}}'
    assert prom.value(f"pipeline_dimension:funnel_dimension_values:max{guard}") == len(set(batch) - {"none"})
    assert prom.value(f"pipeline_dimension:funnel_dimension_values_folded:max{guard}") == 0
    assert prom.value(f"pipeline_dimension:funnel_dimension_values_limit:min{guard}") == MAX_VALUES


@pytest.mark.parametrize("dimension", sorted(DATASET_DIMENSIONS))
def test_the_values_of_a_dimension_add_up_to_the_pipeline_totals(prom, dimension):
    """none and other included, the values of each dimension sum to the pipeline's KPIs."""
    sel = f'{{pipeline="default", dimension="{dimension}"}}'
    for by, dimension_rule, pipeline_rule in (
        ("outcome", "pipeline_dimension_value_outcome:funnel_dimension_deals_closed:sum",
         "pipeline_outcome:funnel_deals_closed:sum"),
        ("currency", "pipeline_dimension_value_currency:funnel_dimension_won_revenue:sum",
         "pipeline_currency:funnel_won_revenue:sum"),
        ("stage", "pipeline_dimension_value_stage:funnel_dimension_deals_open:sum",
         "pipeline_stage:funnel_deals_open:sum"),
        ("stage", "pipeline_dimension_value_stage:funnel_dimension_deals_reached:sum",
         "pipeline_stage:funnel_deals_reached:sum"),
    ):
        summed = {r["metric"][by]: float(r["value"][1])
                  for r in prom.query(f"sum by ({by}) ({dimension_rule}{sel})")}
        total = {r["metric"][by]: float(r["value"][1])
                 for r in prom.query(f'{pipeline_rule}{{pipeline="default"}}')}
        assert summed == total, dimension_rule
    closed = "pipeline_dimension_value_outcome:funnel_dimension_deals_closed:sum"
    assert prom.value(f'sum({closed}{{pipeline="default", dimension="{dimension}", outcome="won"}})') == 4238
    open_value = prom.query("sum by (stage) "
                            f"(pipeline_dimension_value_stage_currency:funnel_dimension_open_value:sum{sel})")
    assert {r["metric"]["stage"]: float(r["value"][1]) for r in open_value} == pytest.approx(
        {"lead": 0, "mql": 0, **OPEN_VALUE}, abs=1e-6)


def test_dimension_series_are_what_the_guard_plans_and_within_the_budget(prom):
    """Series per worker = Σ over (pipeline, dimension) of (kept values + none + other) × the
    series of one value (docs/kpis.md, "Dimensions"): here 2 pipelines of 4 open stages and
    one currency; the lifecycle pipeline has no deal, so none and other only."""
    kept = sum(len(set(batch_by_value(column)) - {"none"}) for column in DATASET_DIMENSIONS.values())
    open_stages = 4  # lead, mql, sql, opportunity: 2·4 + 4·1 + 3·1 + 2
    per_value = 2 * open_stages + open_stages * 1 + 3 * 1 + 2
    expected = (kept + 2 * len(DATASET_DIMENSIONS)) * per_value + 2 * len(DATASET_DIMENSIONS) * per_value
    assert prom.value("fleet:funnel_dimension_series:max") == expected
    assert prom.value("fleet:funnel_dimension_series_budget:max") == 20_000 > expected


def test_dimension_board_shows_the_batch_figures(prom, variables):
    """Win rate and won revenue by value on the board (dimension sector, every value, USD)."""
    batch = batch_by_value("sector")
    rates = _by_value(_panel_result(prom, variables, "funnel-dimensions", "Win rate by value"))
    assert set(rates) == {v for v, k in batch.items() if k["won"] + k["lost"]}
    for value, rate in rates.items():
        k = batch[value]
        assert rate == pytest.approx(k["won"] / (k["won"] + k["lost"]), rel=1e-12)
    revenue = _panel_result(prom, variables, "funnel-dimensions", "Won revenue by value ($currency)")
    assert {r["metric"]["value"]: float(r["value"][1]) for r in revenue} == {
        "none": 0, "other": 0, **{v: k["revenue"] for v, k in batch.items()}}
    assert [float(r["value"][1]) for r in revenue] == sorted((float(r["value"][1]) for r in revenue),
                                                             reverse=True)


def test_dashboards_doc_renders(prom, variables, tmp_path):
    document = _load("document")
    text = document.render(prom, variables, "live_metrics_url fixture (dataset replay)")
    assert "**no data**" not in text
    for board in BOARDS:
        assert f"## {board['title']}" in text
    if os.environ.get("FUNNEL_WRITE_DASHBOARD_DOCS") == "1":
        (REPO / "docs" / "dashboards.md").write_text(text)
