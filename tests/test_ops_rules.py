"""Prometheus rules, config and Alertmanager config (operations view, issue 4).

Runs the real tools: promtool (Debian `prometheus` 2.42) and amtool (Debian
`prometheus-alertmanager`). A missing tool is a failure, not a skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PROM = REPO / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
RUNBOOKS = REPO / "docs" / "runbooks"

# docs/design.md §3 metric contract, plus the three config gauges agreed with the worker
# (funnel_stage_index, funnel_stage_info, funnel_open_value_period; docs/operations-view.md).
CONTRACT = {
    "funnel_deals_open",
    "funnel_open_value",
    "funnel_deals_reached",
    "funnel_deals_closed",
    "funnel_won_revenue",
    "funnel_won_deal_value",
    "funnel_time_to_close_seconds",
    "funnel_stage_duration_seconds",
    "funnel_rep_won_revenue",
    "funnel_customers",
    "funnel_customer_lifetime_value",
    "funnel_deals_reached_window",
    "funnel_deals_closed_window",
    "funnel_won_revenue_window",
    "funnel_time_to_close_window_seconds",
    "funnel_won_revenue_period",
    "funnel_deals_stalled",
    "funnel_stalled_value",
    "funnel_stage_probability",
    "funnel_stall_after_seconds",
    "funnel_revenue_target",
    "funnel_period_elapsed_ratio",
    "funnel_build_info",
    "funnel_events_total",
    "funnel_events_rejected_total",
    "funnel_event_lag_seconds",
    "funnel_consumer_lag_messages",
    "funnel_worker_ready",
    "funnel_sink_errors_total",
    "funnel_dlq_messages_total",
    "funnel_stage_index",
    "funnel_stage_info",
    "funnel_open_value_period",
    "funnel_broker_ack_age_seconds",  # worker health (issue 7): no broker answer for N s
    "funnel_partition_exported",  # partitions whose KPIs a worker exports (issue 18): the gate
    "funnel_partitions",
    "funnel_owner_info",  # rep display names from the config (the leaderboard's names)
    # the CRM edge (issue 15): the webhook receiver and the adapter
    "funnel_ingest_requests_total",
    "funnel_adapt_messages_total",
    "funnel_adapt_consumer_lag_messages",
}
GAUGE_HISTOGRAMS = {
    "funnel_won_deal_value",
    "funnel_time_to_close_seconds",
    "funnel_stage_duration_seconds",
    "funnel_customer_lifetime_value",
    "funnel_time_to_close_window_seconds",
}
CONFIG_GAUGES = {
    "funnel_stage_probability",
    "funnel_stall_after_seconds",
    "funnel_revenue_target",
    "funnel_period_elapsed_ratio",
    "funnel_build_info",
    "funnel_stage_index",
    "funnel_stage_info",
    "funnel_partitions",
    "funnel_owner_info",
}
DERIVED_OPS = ("ratio", "avg", "p50", "p90", "per_second")
RUNBOOK_BASE = "{{ with $externalLabels.runbook_base_url }}{{ . }}/{{ end }}"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} not found: install it (make tools / apt-get install prometheus prometheus-alertmanager)"
        )
    return path


def run(*cmd: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300)


def rules() -> list[dict]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += [dict(r, _group=group["name"]) for r in group["rules"]]
    return out


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def records() -> list[dict]:
    return [r for r in rules() if "record" in r]


def unit_tests() -> list[dict]:
    return [t for path in RULE_TESTS for t in yaml.safe_load(path.read_text())["tests"]]


# ------------------------------------------------------------------ promtool / amtool
def test_promtool_check_rules():
    res = run(tool("promtool"), "check", "rules", "--lint-fatal", *RULE_FILES)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_check_config_loads_the_rules():
    res = run(tool("promtool"), "check", "config", PROM / "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(RULE_FILES)} rule files found" in res.stdout


def test_promtool_rule_unit_tests():
    assert RULE_TESTS, "no rule unit tests in prometheus/tests"
    res = run(tool("promtool"), "test", "rules", *[p.name for p in RULE_TESTS], cwd=PROM / "tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(RULE_TESTS), res.stdout


def test_amtool_check_alertmanager_config():
    res = run(tool("amtool"), "check-config", PROM / "alertmanager.yml")
    assert res.returncode == 0, res.stdout + res.stderr


def test_rule_tests_load_every_rule_file_and_order_every_group():
    groups = {r["_group"] for r in rules()}
    for path in RULE_TESTS:
        doc = yaml.safe_load(path.read_text())
        loaded = {(path.parent / f).resolve() for f in doc["rule_files"]}
        assert loaded <= {p.resolve() for p in RULE_FILES}
        order = doc.get("group_eval_order", [])
        assert set(order) <= groups, f"{path.name}: unknown group in group_eval_order"


# ------------------------------------------------------------------ alert conventions
@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_alert_conventions(rule):
    name = rule["alert"]
    assert re.fullmatch(r"Funnel(?:[A-Z][a-z0-9]*)+", name), "CamelCase, Funnel prefix"
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    ann = rule["annotations"]
    assert {"summary", "description", "runbook_url"} <= set(ann)
    # absolute with the external label runbook_base_url (FUNNEL_RUNBOOK_BASE_URL), else relative
    path = f"docs/runbooks/{name}.md"
    assert ann["runbook_url"] == RUNBOOK_BASE + path
    assert (REPO / path).is_file(), f"missing runbook {path}"
    assert re.fullmatch(r"\d+[mh]", rule.get("for", "")), "every alert needs a for:"


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_every_alert_is_unit_tested_firing_and_quiet(rule):
    cases = [c for t in unit_tests() for c in t.get("alert_rule_test", []) if c["alertname"] == rule["alert"]]
    assert any(c.get("exp_alerts") for c in cases), f"{rule['alert']}: no firing case"
    assert any(not c.get("exp_alerts") for c in cases), f"{rule['alert']}: no quiet case"


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_runbook_sections(rule):
    text = (RUNBOOKS / f"{rule['alert']}.md").read_text()
    assert text.startswith(f"# {rule['alert']}")
    for heading in ("## What it means", "## Likely causes", "## How to check", "## How to fix"):
        assert heading in text, f"{rule['alert']}.md lacks {heading!r}"


def test_no_runbook_without_alert():
    names = {r["alert"] for r in alerts()}
    runbooks = {p.stem for p in RUNBOOKS.glob("*.md") if p.name != "README.md"}  # README: the index
    assert runbooks == names


# ------------------------------------------------------------------ recording rules
@pytest.mark.parametrize("rule", records(), ids=lambda r: r["record"])
def test_recording_rule_name_is_level_metric_operations(rule):
    level, metric, ops = rule["record"].split(":")
    assert re.fullmatch(r"[a-z]+(?:_[a-z]+)*", level)
    assert metric.startswith("funnel_")
    assert re.fullmatch(r"[a-z0-9_]+", ops)


def test_derived_rules_have_exact_value_tests():
    tested = {e["expr"].split("{")[0].strip() for t in unit_tests() for e in t.get("promql_expr_test", [])}
    derived = {
        r["record"]
        for r in records()
        if r["record"].rsplit(":", 1)[1] in DERIVED_OPS
        or "forecast" in r["record"]
        or "expected" in r["record"]
        or "weighted" in r["record"]
        or "next" in r["record"]
    }
    derived -= {
        "pipeline_stage:funnel_deals_reached_next:sum",
        "pipeline_stage_window:funnel_deals_reached_window_next:sum",
        "pipeline_stage_currency:funnel_weighted_open_value:sum",
    }  # inputs of tested KPIs
    assert sorted(derived - tested) == []


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"(?<![:\w])(funnel_[a-z0-9_]+)", expr))
    out = set()
    for n in names:
        base = re.sub(r"_(bucket|gsum|gcount|sum|count)$", "", n)
        out.add(base if base in CONTRACT else n)
    return out


def test_rules_use_only_contract_metrics():
    used = set().union(*(metric_names(r["expr"]) for r in rules()))
    assert sorted(used - CONTRACT) == []
    # gauge histograms are read as _bucket/_gsum/_gcount, never rate()d
    for r in rules():
        for h in GAUGE_HISTOGRAMS:
            assert not re.search(rf"rate\(\s*{h}_", r["expr"]), r.get("record") or r["alert"]


def test_config_gauges_are_aggregated_with_max():
    for r in rules():
        expr = r["expr"]
        for name in CONFIG_GAUGES:
            uses = len(re.findall(rf"(?<![:\w]){name}(?![:\w])", expr))
            maxed = len(re.findall(rf"max\s+by\s*\([^)]*\)\s*\(\s*{name}\b", expr))
            assert uses == maxed, f"{r.get('record') or r['alert']}: {name} not under max by"


def test_recording_rules_name_no_stage_and_copy_no_threshold():
    for r in records():
        assert not re.search(r"\bstage\s*=~?\s*\"", r["expr"]), r["record"]
        assert "2592000" not in r["expr"], f"{r['record']}: stall threshold copied"
        # ratios guard their denominators: division by a `> 0` filtered aggregate
        if r["record"].endswith(":ratio") or r["record"].endswith(":avg"):
            assert "> 0" in r["expr"], f"{r['record']}: unguarded denominator"


def test_every_kpi_rule_is_gated_on_every_partition_exported_once():
    """Without the gate a KPI rule records partial sums during every rebalance, and sums counted
    twice while a dead worker's last scrape lingers (issue 18; tests/test_board_routine_ops.py).
    The gate comes first in its group so that the rules below see this evaluation's value."""
    gate = "fleet:funnel_partition_exported:complete"
    group = [r for r in records() if r["_group"] == "funnel.kpis"]
    assert group[0]["record"] == gate
    recorded = {r["record"] for r in group}
    for r in group[1:]:
        expr = r["expr"]
        business = metric_names(expr) - CONFIG_GAUGES or any(name in expr for name in recorded)
        if business:
            assert expr.rstrip().endswith(f"and on () {gate}"), f"{r['record']}: not gated"
