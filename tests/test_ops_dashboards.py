"""Grafana boards and provisioning (operations view, issue 4).

Static checks: the committed JSON is what grafana/generate.py produces; structure (unique ids,
grid, datasource uid = provisioned uid, every target has an expr, every variable referenced is
defined); schema validity through grafana-foundation-sdk's typed models (a key the schema does
not know is dropped on the round trip); PromQL validity with promtool; docs/dashboards.md lists
every panel.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "grafana"
BOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
BOARDS = {p.stem: json.loads(p.read_text()) for p in BOARD_FILES}
BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__data", "__field", "__series", "__value"}
# Headline panels checked against the dataset in tests/test_ops_live.py.
HEADLINE_PANELS = {
    ("funnel-overview", "Win rate (all time)"),
    ("funnel-overview", "Stage conversion (all time)"),
    ("funnel-revenue", "Average deal size (all time)"),
    ("funnel-revenue", "Won revenue (all time)"),
    ("funnel-revenue", "Sales leaderboard (top 10 reps)"),
    ("funnel-revenue", "Leaderboard by team"),
    ("funnel-revenue", "Customers"),
    ("funnel-revenue", "Customer lifetime value (average)"),
    ("funnel-velocity", "Average sales cycle (won, all time)"),
    ("funnel-leaks", "Stalled deals by stage"),
    ("funnel-dimensions", "Win rate by value"),
    ("funnel-dimensions", "Won revenue by value ($currency)"),
    ("funnel-dimensions", "Stage conversion by value"),
}
# Boards with windowed panels (the `window` variable); funnel-dimensions is all-time only.
WINDOWED = {"funnel-overview", "funnel-velocity", "funnel-revenue", "funnel-leaks"}
# Board variables for evaluating queries outside Grafana: `value` = All (its regex), one currency.
QUERY_VARIABLES = {"pipeline": "default", "window": "30d", "dimension": "sector", "value": ".*",
                   "currency": "USD", "period": "quarter"}


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(name, GRAFANA / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def provisioned_datasource() -> dict:
    doc = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert doc["apiVersion"] == 1
    defaults = [d for d in doc["datasources"] if d.get("isDefault")]
    assert len(defaults) == 1
    return defaults[0]


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def targets(board: dict):
    for p in panels(board):
        for t in p.get("targets", []):
            yield p, t


def variables_used(text: str) -> set[str]:
    found = re.findall(r"\$\{(\w+)(?:[:.][^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)", text)
    names = {a or b or c for a, b, c in found}
    return {n for n in names if not n.isdigit()}  # "$1" is a label_replace group


# ------------------------------------------------------------------ generation
def test_five_boards():
    assert set(BOARDS) == WINDOWED | {"funnel-dimensions"}


def test_committed_boards_are_generated():
    rendered = load_module("generate").render()
    assert set(rendered) == {p.name for p in BOARD_FILES}
    for name, text in rendered.items():
        assert (GRAFANA / "dashboards" / name).read_text() == text, (
            f"{name} is stale: run python grafana/generate.py"
        )


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_board_structure(uid):
    board = BOARDS[uid]
    assert board["uid"] == uid and 8 <= len(uid) <= 40
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = set()
    for p in panels(board):
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0
        assert g["x"] + g["w"] <= 24, f"{p['title']} exceeds the 24-column grid"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] != "row":
            assert p.get("targets"), f"{p['title']} has no query"
            assert p.get("description"), f"{p['title']} has no description"
            assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']} has no unit"
    for p, t in targets(board):
        assert t.get("expr", "").strip(), f"{p['title']} {t.get('refId')}: empty expr"
        assert "vector(" not in t["expr"], f"{p['title']}: no or vector(0) padding"
    titles = [p["title"] for p in panels(board)]
    assert len(titles) == len(set(titles)), "duplicate panel titles"


def test_titles_and_uids_unique_across_boards():
    assert len({b["title"] for b in BOARDS.values()}) == len(BOARDS)


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_datasource_references_resolve_to_the_provisioned_uid(uid):
    ds = provisioned_datasource()
    board = BOARDS[uid]
    refs = [p["datasource"] for p in panels(board) if "datasource" in p]
    refs += [t["datasource"] for _, t in targets(board) if "datasource" in t]
    refs += [v["datasource"] for v in board["templating"]["list"] if "datasource" in v]
    assert refs
    for ref in refs:
        assert ref == {"type": ds["type"], "uid": ds["uid"]}
    for p in panels(board):
        if p["type"] != "row":
            assert "datasource" in p


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_variables(uid):
    board = BOARDS[uid]
    defined = {v["name"]: v for v in board["templating"]["list"]}
    assert "pipeline" in defined
    assert ("window" in defined) == (uid in WINDOWED)
    if "window" in defined:
        assert defined["window"]["query"] == "7d,30d,90d"
    for v in defined.values():
        if v["type"] == "query":
            assert v["query"].startswith("label_values(") and v["refresh"] == 2, v["name"]
    text = json.dumps([p for p in panels(board)])
    used = variables_used(text)
    assert used - BUILTIN_VARS <= set(defined), f"undefined: {used - BUILTIN_VARS - set(defined)}"
    assert set(defined) <= used, f"defined but unused: {set(defined) - used}"


def test_headline_panels_exist():
    have = {(uid, p["title"]) for uid, b in BOARDS.items() for p in panels(b)}
    assert have >= HEADLINE_PANELS


def test_provider_and_datasource_provisioning():
    ds = provisioned_datasource()
    assert ds["type"] == "prometheus" and ds["uid"] == load_module("generate").DATASOURCE_UID
    assert ds["jsonData"]["timeInterval"] == "15s"
    prom = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
    assert prom["global"]["scrape_interval"] == ds["jsonData"]["timeInterval"]
    doc = yaml.safe_load((GRAFANA / "provisioning/dashboards/funnel.yml").read_text())
    assert doc["apiVersion"] == 1
    (provider,) = doc["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# ------------------------------------------------------------------ schema (SDK round trip)
def _lost(ours, theirs, path=""):
    """Keys or values of `ours` that the schema-typed round trip did not keep."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path}: became {type(theirs).__name__}"]
        out = []
        for k, v in ours.items():
            out += (
                [f"{path}.{k}: not in the schema"] if k not in theirs else _lost(v, theirs[k], f"{path}.{k}")
            )
        return out
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path}: list changed"]
        return [
            e for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for e in _lost(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [f"{path}: {ours!r} -> {theirs!r}"]


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_board_validates_against_the_grafana_dashboard_schema(uid):
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    board = BOARDS[uid]
    typed = Dashboard.from_json(board)
    assert typed.schema_version == 41
    roundtrip = json.loads(json.dumps(typed, cls=JSONEncoder))
    assert _lost(board, roundtrip) == []


# ------------------------------------------------------------------ PromQL
def test_every_query_is_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found (make tools)")
    lp = load_module("live_prometheus")
    rules = []
    for uid, board in BOARDS.items():
        for p, t in targets(board):
            expr = lp.substitute(t["expr"], QUERY_VARIABLES)
            assert "$" not in expr.replace('"$1"', ""), f"{uid}/{p['title']}: unresolved var"
            rules.append({"record": f"board:q{len(rules)}:check", "expr": expr})
    path = tmp_path / "board_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "boards", "rules": rules}]}))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_board_queries_use_recording_rules_or_contract_metrics():
    rule_names = set()
    for path in (REPO / "prometheus/rules").glob("*.yml"):
        for g in yaml.safe_load(path.read_text())["groups"]:
            rule_names |= {r["record"] for r in g["rules"] if "record" in r}
    from tests.test_ops_rules import CONTRACT, metric_names  # one contract list

    for uid, board in BOARDS.items():
        for p, t in targets(board):
            for name in re.findall(r"\b[a-z_]+:funnel_[a-z0-9_]+:[a-z0-9_]+\b", t["expr"]):
                assert name in rule_names, f"{uid}/{p['title']}: unknown rule {name}"
            raw = re.sub(r"\b[a-z_]+:funnel_[a-z0-9_]+:[a-z0-9_]+\b", "", t["expr"])
            assert metric_names(raw) <= CONTRACT, f"{uid}/{p['title']}: unknown metric"


# Panels that read an exact (gated) KPI series on purpose: a derivative over a held plateau
# would show a made-up flat stretch, and deriv() over the exact samples spans a gap anyway.
EXACT_KPI_PANELS = {("funnel-velocity", "Stage entries per hour")}
KPI_NAME = re.compile(r"\b[a-z_]+:funnel_[a-z0-9_]+:[a-z0-9_]+\b")


def test_kpi_panels_read_the_held_series_and_every_board_says_how_old_they_are():
    """During a rebalance the exact KPI series are absent for seconds; the boards read the
    `_held` twins (the last complete value, for a bounded time) and open with the as-of time
    and age (issue 24, item 7; tests/test_board_routine_ops.py measures it)."""
    from tests.test_ops_rules import HOLD_SECONDS  # checked against the rule there

    gated = {r["record"] for g in yaml.safe_load((REPO / "prometheus/rules/funnel_recording.yml")
                                                 .read_text())["groups"]
             for r in g["rules"] if "record" in r
             and r["expr"].rstrip().endswith("and on () fleet:funnel_partition_exported:complete")}
    assert gated
    exact = set()
    for uid, board in BOARDS.items():
        for p, t in targets(board):
            assert "fleet:funnel_partition_exported:complete" not in t["expr"], f"{uid}/{p['title']}"
            assert not metric_names_in(t["expr"]) & GATED_RAW, f"{uid}/{p['title']}: raw KPI gauge"
            if set(KPI_NAME.findall(t["expr"])) & gated:
                exact.add((uid, p["title"]))
        first = [p["title"] for p in board["panels"][:2]]
        assert first == ["KPIs as of", "KPI age"], f"{uid} does not open with the KPIs' age"
        age = board["panels"][1]
        assert age["targets"][0]["expr"] == "time() - fleet:funnel_kpis_as_of:timestamp"
        steps = age["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[-1] == {"color": "red", "value": HOLD_SECONDS}  # the rules' bound
    assert load_module("generate").HOLD_SECONDS == HOLD_SECONDS
    assert exact == EXACT_KPI_PANELS


# raw business gauges: a board summing them would show partial sums during a rebalance
GATED_RAW = {"funnel_deals_open", "funnel_open_value", "funnel_won_deal_value", "funnel_deals_closed",
             "funnel_customer_lifetime_value", "funnel_deals_reached", "funnel_won_revenue",
             "funnel_dimension_deals_open", "funnel_dimension_open_value", "funnel_dimension_deals_reached",
             "funnel_dimension_deals_closed", "funnel_dimension_time_to_close_seconds",
             "funnel_dimension_won_revenue"}


def metric_names_in(expr: str) -> set[str]:
    from tests.test_ops_rules import metric_names

    return metric_names(KPI_NAME.sub("", expr))


# ------------------------------------------------------------------ docs
def test_dashboards_doc_lists_every_panel():
    doc = (REPO / "docs" / "dashboards.md").read_text()
    for uid, board in BOARDS.items():
        assert f"## {board['title']} (`{uid}`)" in doc
        for p in panels(board):
            if p["type"] != "row":
                assert f"#### {p['title']}\n" in doc, f"docs/dashboards.md lacks {p['title']}"


# ------------------------------------------------------------------ the dimension board
def test_dimension_board_compares_the_values_of_one_dimension_in_one_currency():
    """Every KPI panel of funnel-dimensions selects the board's pipeline, dimension and values;
    money panels one currency (a sum over currencies would add dollars to euros); the variables
    chain pipeline → dimension → value (multi, All) and currency."""
    board = BOARDS["funnel-dimensions"]
    defined = {v["name"]: v for v in board["templating"]["list"]}
    assert list(defined) == ["pipeline", "dimension", "value", "currency"]
    assert '$pipeline' in defined["dimension"]["query"]
    for name in ("value", "currency"):
        assert 'pipeline="$pipeline", dimension="$dimension"' in defined[name]["query"], name
    assert defined["value"]["multi"] and defined["value"]["includeAll"]
    assert not defined["currency"]["multi"] and not defined["currency"]["includeAll"]
    money = ("funnel_dimension_won_revenue", "funnel_dimension_open_value", "funnel_dimension_won_deal_value")
    kpi_panels = 0
    for p, t in targets(board):
        if ":funnel_dimension_" not in t["expr"] or p["title"].startswith("Guard"):
            continue
        kpi_panels += 1
        assert 'pipeline="$pipeline", dimension="$dimension", value=~"$value"' in t["expr"], p["title"]
        if any(m in t["expr"] for m in money):
            assert 'currency="$currency"' in t["expr"] and "$currency" in p["title"], p["title"]
    assert kpi_panels >= 8
