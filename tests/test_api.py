"""The KPI HTTP API against a real worker: token, readiness, and no 5xx for anything
schemathesis generates from docs/openapi.yaml."""

import json
import urllib.error
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from models.kpis import total
from streams.kafka.settings import Settings
from streams.tools.broker import EmbeddedBroker
from streams.tools.producer import produce
from streams.tools.simulator import Simulation

from .conftest import ROOT, WorkerProcess, run_async, settled, wait_until

pytestmark = pytest.mark.broker
TOKEN = "s3cret-token"


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
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        worker = WorkerProcess(broker.url, workdir, FUNNEL_API_TOKEN=TOKEN, FUNNEL_CLOCK="stream",
                               FUNNEL_TICK_INTERVAL="1").start()
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
    assert get(f"{base}/kpis/nope")[0] == 404
    assert get(f"{base}/healthz", token=None)[0] == 200
    assert get(f"{base}/readyz", token=None) == (
        200, {"status": "ready", "tables": "recovered", "broker": "ok"})


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
