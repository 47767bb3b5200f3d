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
    # the Salesforce CDC subscriber (issue 25)
    "funnel_salesforce_cdc_connected",
    "funnel_salesforce_cdc_lag_seconds",
    "funnel_salesforce_cdc_gaps_total",
    "funnel_salesforce_cdc_replay_fallbacks_total",
    # KPIs per dimension value (issue 23, item 3): business gauges, summed by the rules ...
    "funnel_dimension_deals_open",
    "funnel_dimension_open_value",
    "funnel_dimension_deals_reached",
    "funnel_dimension_deals_closed",
    "funnel_dimension_time_to_close_seconds",
    "funnel_dimension_won_revenue",
    # ... the guard, per worker (max / min, never summed) ...
    "funnel_dimension_values",
    "funnel_dimension_values_folded",
    "funnel_dimension_values_limit",
    "funnel_dimension_series",
    # ... and its config
    "funnel_dimension_series_budget",
    # forecast categories (issue 23, item 6): open amounts by category, and the stage mapping
    "funnel_forecast_value",
    "funnel_stage_forecast_category",
    # reporting currency and quotas (issue 23, items 4 and 5): business gauges ...
    "funnel_reporting_won_revenue",
    "funnel_reporting_won_revenue_window",
    "funnel_reporting_won_revenue_period",
    "funnel_reporting_open_value",
    "funnel_reporting_rep_won_revenue",
    "funnel_reporting_rep_won_revenue_period",
    "funnel_reporting_unconverted_value",
    "funnel_rep_won_revenue_period",
    # ... and config (max)
    "funnel_exchange_rate",
    "funnel_rep_quota",
    "funnel_team_quota",
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
    "funnel_dimension_series_budget",
    "funnel_stage_forecast_category",
    "funnel_exchange_rate",
    "funnel_rep_quota",
    "funnel_team_quota",
}
DERIVED_OPS = ("ratio", "avg", "p50", "p90", "per_second")
RUNBOOK_BASE = "{{ with $externalLabels.runbook_base_url }}{{ . }}/{{ end }}"
# Funnel health (stalled deals, conversion and win-rate drops) is for sales leaders; the rest is
# the service's own health, for on-call (issue 24; prometheus/alertmanager.yml routes by `team`).
SALES_GROUPS = {"funnel.alerts.leaks"}


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
    assert rule["labels"]["team"] == ("sales" if rule["_group"] in SALES_GROUPS else "ops")
    ann = rule["annotations"]
    assert {"summary", "description", "runbook_url"} <= set(ann)
    # absolute with the external label runbook_base_url (FUNNEL_RUNBOOK_BASE_URL), else relative
    path = f"docs/runbooks/{name}.md"
    assert ann["runbook_url"] == RUNBOOK_BASE + path
    assert (REPO / path).is_file(), f"missing runbook {path}"
    assert re.fullmatch(r"\d+[mh]", rule.get("for", "")), "every alert needs a for:"


def test_sales_alerts_are_the_funnel_health_ones():
    sales = {r["alert"] for r in alerts() if r["labels"]["team"] == "sales"}
    assert sales == {"FunnelStalledDealsHigh", "FunnelStageConversionDrop", "FunnelWinRateDrop"}
    # promtool compares whole label sets: each firing case states the team it is routed by
    for case in (c for t in unit_tests() for c in t.get("alert_rule_test", [])):
        for alert in case.get("exp_alerts") or []:
            team = "sales" if case["alertname"] in sales else "ops"
            assert alert["exp_labels"]["team"] == team, case["alertname"]


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_every_alert_is_unit_tested_firing_and_quiet(rule):
    cases = [c for t in unit_tests() for c in t.get("alert_rule_test", []) if c["alertname"] == rule["alert"]]
    assert any(c.get("exp_alerts") for c in cases), f"{rule['alert']}: no firing case"
    assert any(not c.get("exp_alerts") for c in cases), f"{rule['alert']}: no quiet case"


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r["alert"])
def test_runbook_sections(rule):
    text = (RUNBOOKS / f"{rule['alert']}.md").read_text()
    assert text.startswith(f"# {rule['alert']}")
    assert f"Team: **{rule['labels']['team']}**" in text.splitlines()[2], "the runbook names the team"
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
    derived = {d for d in derived if not d.endswith(HELD)}  # copies: test_every_held_rule_is_...
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


def uses_and_aggregated(expr: str, name: str, aggregations: str) -> tuple[int, int]:
    """How often ``expr`` reads the metric ``name``, and how often directly under one of
    ``aggregations`` (a regex alternation) ``by (...)``."""
    uses = len(re.findall(rf"(?<![:\w]){name}(?![:\w])", expr))
    under = len(re.findall(rf"(?:{aggregations})\s+by\s*\([^)]*\)\s*\(\s*{name}(?![:\w])", expr))
    return uses, under


def test_config_gauges_are_aggregated_with_max():
    for r in rules():
        expr = r["expr"]
        for name in CONFIG_GAUGES:
            uses, maxed = uses_and_aggregated(expr, name, "max")
            assert uses == maxed, f"{r.get('record') or r['alert']}: {name} not under max by"


# What the dimensions' guard did, per worker (each counts the values of its own partitions): a sum
# over workers means nothing; the fleet view is the worker that folded most or kept fewest.
PER_WORKER_GAUGES = {"funnel_dimension_values", "funnel_dimension_values_folded",
                     "funnel_dimension_values_limit", "funnel_dimension_series"}


def test_per_worker_guard_gauges_are_aggregated_with_max_or_min_and_never_gated():
    used = set()
    for r in rules():
        expr = r["expr"]
        for name in PER_WORKER_GAUGES:
            uses, kept = uses_and_aggregated(expr, name, "max|min")
            assert uses == kept, f"{r.get('record') or r['alert']}: {name} not under max/min by"
            if uses and "record" in r:
                used.add(name)
                # describes the workers, not the deals: recorded through rebalances
                assert r["_group"] != "funnel.kpis" and "fleet:funnel_partition_exported" not in expr
    assert used == PER_WORKER_GAUGES


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
        if r["record"] in HOLD_RULES or r["record"].endswith(HELD):
            continue  # the boards' held copies: test_every_held_rule_is_its_exact_twin_...
        expr = r["expr"]
        business = metric_names(expr) - CONFIG_GAUGES or any(name in expr for name in recorded)
        if business:
            assert expr.rstrip().endswith(f"and on () {gate}"), f"{r['record']}: not gated"


HELD = "_held"
HOLD_RULES = ("fleet:funnel_kpis_as_of:timestamp", "fleet:funnel_kpis_held:age_seconds")
HOLD_SECONDS = 120  # docs/operations.md, "Rebalances: what the boards show"


def test_every_held_rule_is_its_exact_twin_or_its_last_value_within_the_bound():
    """The boards' `_held` series (issue 24, item 7) are the gated KPI while the gate is open and
    their own previous sample, only while fleet:funnel_kpis_held:age_seconds says the last
    complete evaluation is at most HOLD_SECONDS old; they follow the hold rules and their twins
    in the gate's group (prometheus/tests/held_test.yml gives the values)."""
    group = [r for r in records() if r["_group"] == "funnel.kpis"]
    names = [r["record"] for r in group]
    hold = [names.index(n) for n in HOLD_RULES]
    gate = "fleet:funnel_partition_exported:complete"
    assert re.sub(r"\s+", " ", group[hold[0]]["expr"]).strip() == (
        f"timestamp({gate}) or on () {HOLD_RULES[0]}")
    assert re.sub(r"\s+", " ", group[hold[1]]["expr"]).strip() == (
        f"(time() - {HOLD_RULES[0]} <= {HOLD_SECONDS}) unless on () {gate}")
    held = [r for r in group if r["record"].endswith(HELD)]
    assert held
    for r in held:
        exact = r["record"].removesuffix(HELD)
        assert exact in names and names.index(exact) < hold[0] < hold[1] < names.index(r["record"])
        assert group[names.index(exact)]["expr"].rstrip().endswith(f"and on () {gate}"), exact
        assert re.sub(r"\s+", " ", r["expr"]).strip() == (
            f"{exact} or ({r['record']} and on () {HOLD_RULES[1]})"), r["record"]
    assert not [r["record"] for r in records() if r["_group"] != "funnel.kpis" and HELD in r["record"]]


def test_alerts_read_exact_kpis_never_held_ones():
    """A held value is the truth of up to HOLD_SECONDS ago: alerts judge the current truth."""
    for rule in alerts():
        assert HELD not in rule["expr"] and "funnel_kpis_as_of" not in rule["expr"], rule["alert"]


# ------------------------------------------------------------------ the prometheus entrypoint
def render_prometheus(tmp: Path, files: dict[str, str] | None = None,
                      **env: str) -> subprocess.CompletedProcess:
    """prometheus/prometheus-render.sh (the prometheus service's entrypoint) with `true` as
    Prometheus, rendering the shipped prometheus.yml into ``tmp``/rendered.yml."""
    folder = tmp / "secrets"
    folder.mkdir(exist_ok=True)
    for name, value in (files or {}).items():
        (folder / name).write_text(value)
    return subprocess.run(
        ["/bin/sh", PROM / "prometheus-render.sh", f"--config.file={tmp / 'rendered.yml'}"],
        env={"PATH": "/usr/bin:/bin", "PROMETHEUS_TEMPLATE": str(PROM / "prometheus.yml"),
             "PROMETHEUS_FILES": str(folder), "PROMETHEUS_BIN": "/bin/true", **env},
        capture_output=True, text=True, timeout=30)


def test_the_rendered_config_loads_the_rules_from_anywhere_without_remote_write(tmp_path):
    res = render_prometheus(tmp_path)
    assert res.returncode == 0, res.stderr
    assert "remote_write off" in res.stderr
    rendered = yaml.safe_load((tmp_path / "rendered.yml").read_text())
    assert rendered["rule_files"] == [f"{PROM}/rules/*.yml"]  # relative to the template, not /prometheus
    assert "remote_write" not in rendered
    check = run(tool("promtool"), "check", "config", tmp_path / "rendered.yml", cwd=tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(RULE_FILES)} rule files found" in check.stdout


def test_remote_write_from_env_with_basic_auth_or_a_bearer_token(tmp_path):
    url = 'https://mimir.corp.test/api/v1/push?a=1&b="2"'
    res = render_prometheus(tmp_path, {"remote_write_password": "pw\n"}, FUNNEL_REMOTE_WRITE_URL=url,
                            FUNNEL_REMOTE_WRITE_USERNAME="funnel")
    assert res.returncode == 0, res.stderr
    check = run(tool("promtool"), "check", "config", tmp_path / "rendered.yml")
    assert check.returncode == 0, check.stdout + check.stderr
    [write] = yaml.safe_load((tmp_path / "rendered.yml").read_text())["remote_write"]
    assert write == {"url": url,
                     "basic_auth": {"username": "funnel",
                                    "password_file": f"{tmp_path}/secrets/remote_write_password"}}
    bearer = tmp_path / "bearer"
    bearer.mkdir()
    res = render_prometheus(bearer, {"remote_write_bearer_token": "t\n"},
                            FUNNEL_REMOTE_WRITE_URL="http://receive:19291/api/v1/receive")
    assert res.returncode == 0, res.stderr
    [write] = yaml.safe_load((bearer / "rendered.yml").read_text())["remote_write"]
    assert write["authorization"] == {"credentials_file": f"{bearer}/secrets/remote_write_bearer_token"}


@pytest.mark.parametrize("env, files, said", [
    ({"FUNNEL_REMOTE_WRITE_URL": "mimir:9009/push"}, {}, "must be an http(s):// URL"),
    ({"FUNNEL_REMOTE_WRITE_URL": "https://m.test/push", "FUNNEL_REMOTE_WRITE_USERNAME": "u"}, {},
     "put its password in"),
    ({"FUNNEL_REMOTE_WRITE_USERNAME": "u"}, {}, "USERNAME needs FUNNEL_REMOTE_WRITE_URL"),
])
def test_a_half_configured_remote_write_is_a_clear_error(tmp_path, env, files, said):
    res = render_prometheus(tmp_path, files, **env)
    assert res.returncode == 1
    assert said in res.stderr
    assert not (tmp_path / "rendered.yml").exists()
