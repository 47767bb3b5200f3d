"""The KPI HTTP API against a real worker: token, readiness, and no 5xx for anything
schemathesis generates from docs/openapi.yaml."""

import json
import urllib.error
import urllib.request

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings

from models.config import DEFAULT_CONFIG
from models.kpis import total
from streams.http.api import minor_unit, rounded
from streams.kafka.settings import Settings
from streams.tools.broker import EmbeddedBroker
from streams.tools.producer import produce
from streams.tools.simulator import REPS, Simulation

from .conftest import ROOT, WorkerProcess, run_async, settled, wait_until

pytestmark = pytest.mark.broker
TOKEN = "s3cret-token"
# The worker's reps: the first three in team North, the next ones in South, the last unlisted
# (team none).
TEAMS = {rep: "North" if i < 3 else "South" for i, rep in enumerate(REPS[:-1])}


def get(url, token=TOKEN):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("api")
    config = workdir / "funnel.yaml"
    owners = {rep: {"name": rep, "team": team} for rep, team in TEAMS.items()}
    # The simulated deals carry no region: every deal is in the dimension's value none.
    config.write_text(yaml.safe_dump({**yaml.safe_load(DEFAULT_CONFIG.read_text()), "owners": owners,
                                      "dimensions": {"region": {}}}))
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        worker = WorkerProcess(broker.url, workdir, FUNNEL_API_TOKEN=TOKEN, FUNNEL_CLOCK="stream",
                               FUNNEL_TICK_INTERVAL="1", FUNNEL_CONFIG=str(config)).start()
        try:
            worker.wait_ready()
            events = Simulation(seed=3, deals=300, days=60, end=1_700_000_000).events()
            run_async(produce(Settings(broker=broker.url, partitions=4), events, progress=False))
            settled([worker], len(events))
            base = f"http://127.0.0.1:{worker.port}"
            wait_until(lambda: get(f"{base}/kpis/default")[0] == 200, 30, what="first snapshot")
            yield base, worker
        finally:
            worker.stop()


def test_endpoints_answer_with_the_snapshot(api):
    base, worker = api
    status, body = get(f"{base}/kpis")
    assert status == 200
    assert {p["pipeline"] for p in body["pipelines"]} >= {"default"}
    won = total(worker.samples(), "funnel_deals_closed", pipeline="default", outcome="won")
    snapshot = wait_until(lambda: (lambda s: s if s["all_time"]["won"] == won else None)(
        get(f"{base}/kpis/default")[1]), 30, what="snapshot caught up with /metrics")
    assert snapshot["pipeline"] == "default" and won > 0
    status, board = get(f"{base}/kpis/default/leaderboard")
    assert status == 200 and board["leaderboard"] == snapshot["leaderboard"]
    assert board["teams"] == snapshot["teams"] and {t["team"] for t in board["teams"]} <= {
        "North", "South", "none"}
    # per dimension value: the values add up to the pipeline's figures
    values = snapshot["dimensions"]["region"]
    assert [v["value"] for v in values] == ["none", "other"]
    assert sum(v["won"] for v in values) == won
    assert sum(v["open_deals"] for v in values) == snapshot["open_deals"]
    assert values[0]["win_rate"] == snapshot["all_time"]["win_rate"]
    assert get(f"{base}/kpis/nope")[0] == 404
    assert get(f"{base}/healthz", token=None)[0] == 200
    assert get(f"{base}/readyz", token=None) == (
        200, {"status": "ready", "tables": "recovered", "broker": "ok"})


def money_values(body: dict) -> list[float]:
    """Every amount of money in a snapshot or leaderboard answer."""
    sets = [body.get("all_time") or {}, *(body.get("windows") or {}).values()]
    customers = body.get("customers") or {}
    values = [body.get("pipeline_value"), body.get("weighted_pipeline"),
              *(s.get(k) for s in sets for k in ("won_revenue", "avg_deal_size")),
              *(row.get(k) for row in body.get("stages") or [] for k in ("open_value", "stalled_value")),
              *(row["won_revenue"] for row in body.get("leaderboard") or []),
              *(row["won_revenue"] for row in body.get("teams") or []),
              customers.get("avg_lifetime_value"), *(c["lifetime_value"] for c in customers.get("top") or []),
              *(t.get(k) for t in (body.get("targets") or {}).values()
                for k in ("target", "won", "expected_to_date", "forecast")),
              *(v.get(k) for vs in (body.get("dimensions") or {}).values() for v in vs
                for k in ("open_value", "won_revenue", "avg_deal_size")),
              *(s["open_value"] for vs in (body.get("dimensions") or {}).values() for v in vs
                for s in v["stages"])]
    return [value for value in values if value is not None]


def test_money_is_rounded_to_the_currency_minor_unit(api):
    """The leaderboard showed float sums such as 591027.8799999999."""
    base, worker = api
    snapshot, board = get(f"{base}/kpis/default")[1], get(f"{base}/kpis/default/leaderboard")[1]
    assert snapshot["currency"] == board["currency"] == "USD"
    for body in (snapshot, board):
        values = money_values(body)
        assert values and all(value == round(value, 2) for value in values), values
    # the amounts are the worker's own float sums (its rep revenue on /metrics), to the cent
    reps = {labels["owner"]: value for labels, value in worker.samples()["funnel_rep_won_revenue"]
            if labels["pipeline"] == "default" and labels["currency"] == "USD"}
    assert board["leaderboard"]
    for row in board["leaderboard"]:
        assert row["won_revenue"] == round(reps[row["owner"]], 2)
    # each team's: the sum of its reps' (unlisted reps in team none), every team with a won deal
    teams: dict[str, float] = {}
    for owner, value in reps.items():
        teams[TEAMS.get(owner, "none")] = teams.get(TEAMS.get(owner, "none"), 0.0) + value
    assert {row["team"]: row["won_revenue"] for row in board["teams"]} == {
        team: round(value, 2) for team, value in teams.items()}
    assert [row["won_revenue"] for row in board["teams"]] == sorted(
        (row["won_revenue"] for row in board["teams"]), reverse=True)


def test_amounts_round_to_each_currency_minor_unit():
    body = {"pipeline_value": 591027.8799999999, "weighted_pipeline": 0.1 + 0.2,
            "all_time": {"won_revenue": 10.005, "avg_deal_size": None, "win_rate": 0.333333},
            "windows": {"7d": {"won_revenue": 1.23456, "sales_velocity_per_second": 0.0012345}},
            "stages": [{"open_value": 2.675000001, "stalled_value": 0.0}],
            "leaderboard": [{"owner": "a", "won_revenue": 591027.8799999999}],
            "teams": [{"team": "East", "won_revenue": 0.1 + 0.7}],
            "customers": {"avg_lifetime_value": 3.14159, "top": [{"account": "x", "lifetime_value": 9.999}]},
            "targets": {"month": {"target": 100.0, "won": 33.333, "expected_to_date": None, "forecast": 1.005,
                                  "attainment": 0.33333, "elapsed_ratio": 0.123456}},
            "dimensions": {"region": [{"value": "eu", "open_value": 0.1 + 0.2, "won_revenue": 10.005,
                                       "avg_deal_size": 1 / 3, "win_rate": 1 / 3,
                                       "stages": [{"stage": "lead", "open_value": 2.675000001,
                                                   "conversion_to_next": 1 / 3}]}]}}
    usd = rounded(json.loads(json.dumps(body)), "USD")
    assert usd["pipeline_value"] == 591027.88 and usd["leaderboard"][0]["won_revenue"] == 591027.88
    assert usd["teams"][0]["won_revenue"] == 0.8
    assert usd["weighted_pipeline"] == 0.3 and usd["windows"]["7d"]["won_revenue"] == 1.23
    assert usd["stages"][0]["open_value"] == 2.68 and usd["customers"]["top"][0]["lifetime_value"] == 10.0
    assert usd["targets"]["month"]["won"] == 33.33
    eu = usd["dimensions"]["region"][0]
    assert (eu["open_value"], eu["won_revenue"], eu["avg_deal_size"]) == (0.3, 10.01, 0.33)
    assert eu["stages"][0]["open_value"] == 2.68
    assert eu["win_rate"] == 1 / 3 and eu["stages"][0]["conversion_to_next"] == 1 / 3
    # ratios and rates are not money: untouched
    assert usd["all_time"]["win_rate"] == 0.333333 and usd["targets"]["month"]["attainment"] == 0.33333
    assert usd["windows"]["7d"]["sales_velocity_per_second"] == 0.0012345
    assert rounded(json.loads(json.dumps(body)), "JPY")["pipeline_value"] == 591028.0
    assert rounded(json.loads(json.dumps(body)), "kwd")["customers"]["avg_lifetime_value"] == 3.142
    assert [minor_unit(c) for c in ("USD", "EUR", "JPY", "KRW", "BHD", "CLF")] == [2, 2, 0, 0, 3, 4]


def test_token_is_required_when_configured(api):
    base, _ = api
    assert get(f"{base}/kpis/default", token=None)[0] == 401
    assert get(f"{base}/kpis/default", token="wrong")[0] == 401
    assert get(f"{base}/kpis", token=None)[0] == 401


SCHEMA = schemathesis.openapi.from_path(ROOT / "docs" / "openapi.yaml")


@pytest.mark.parametrize("operation", [op.ok() for op in SCHEMA.get_all_operations()],
                         ids=lambda op: op.label)
def test_no_5xx_for_anything_the_openapi_file_allows(api, operation):
    base, _ = api

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case):
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):
            response = case.call(base_url=base, headers=headers)
            assert response.status_code < 500, (case.path, response.status_code)

    check()
