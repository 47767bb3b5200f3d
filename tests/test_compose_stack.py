"""docker-compose.yml run for real, as local processes (tests/compose_harness.py): signed HubSpot
and Pipedrive webhooks travel receiver -> adapter -> workers -> Prometheus rules, an alert
travels Prometheus -> Alertmanager -> a webhook receiver, and the settings of .env reach the
processes. A service left out of compose, a wrong command or a missing variable fails here.
Issue 24: the default profiles (bundled Kafka) and a managed setup (profile off, FUNNEL_BROKER
elsewhere), the backfill service run as the image's user with its checkpoints on its volume, the
/kpis API closed by the token file, Prometheus' retention and remote_write from .env.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import yaml

from models.kpis import total
from streams.crm.sources import hubspot, pipedrive
from streams.tools.broker import EmbeddedBroker, free_port

from .alert_sink import AlertSink
from .compose_harness import (
    REPO,
    ComposeError,
    Stack,
    load_compose,
    read_env_file,
    topology_problems,
    write_env_file,
)
from .conftest import merged, scrape, wait_until
from .test_sources_common import CTX, fixture, raw

pytestmark = pytest.mark.broker
COMPOSE_FILE = REPO / "docker-compose.yml"
HUBSPOT_SECRET = "compose-hubspot-" + secrets.token_hex(8)
PIPEDRIVE_AUTH = "pipedrive-hook:" + secrets.token_hex(8)
PUBLIC_URL = "https://hooks.funnel.test"  # what HubSpot would call through the proxy
RUNBOOKS = "https://git.funnel.test/ops/funnel-kpi/blob/main"
MAX_BODY = 262144
QUARTER_TARGET = 3_500_000  # the shipped config says 3,000,000: proves the mounted file is read
WEBHOOK_TOKEN = secrets.token_hex(12)
API_TOKEN = secrets.token_hex(16)  # secrets/api_token: the workers' /kpis bearer token
REMOTE_WRITE_PASSWORD = secrets.token_hex(8)


class RemoteWriteSink:
    """A remote_write endpoint (Thanos Receive, Mimir): records each push's path and headers
    (the body is snappy-compressed protobuf)."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, dict[str, str], int]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.pushes.append((self.path, dict(self.headers), len(body)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/v1/push"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def env_values(tmp: Path, sink: AlertSink) -> dict[str, str]:
    """What an operator puts in .env, plus the host paths the test owns."""
    config = tmp / "funnel.yaml"
    shipped = (REPO / "models/funnel.yaml").read_text()
    config.write_text(shipped.replace("quarter: 3000000", f"quarter: {QUARTER_TARGET}", 1))
    secrets_dir = tmp / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "webhook_bearer_token").write_text(WEBHOOK_TOKEN + "\n")
    (secrets_dir / "webhook_url").write_text(sink.url("/alerts") + "\n")
    (secrets_dir / "api_token").write_text(API_TOKEN + "\n")
    (secrets_dir / "remote_write_password").write_text(REMOTE_WRITE_PASSWORD + "\n")
    return {
        "GRAFANA_ADMIN_USER": "admin",
        "GRAFANA_ADMIN_PASSWORD": secrets.token_hex(8),
        "REDIS_PASSWORD": secrets.token_hex(12),
        "FUNNEL_HUBSPOT_CLIENT_SECRET": HUBSPOT_SECRET,
        "FUNNEL_PIPEDRIVE_BASIC_AUTH": PIPEDRIVE_AUTH,
        "FUNNEL_PARTITIONS": "4",
        "FUNNEL_RUNBOOK_BASE_URL": RUNBOOKS,
        "FUNNEL_PROMETHEUS_URL": "http://prometheus.funnel.test:9090",
        "FUNNEL_ALERTMANAGER_URL": "http://alertmanager.funnel.test:9093",
        "FUNNEL_CONFIG_FILE": str(config),
        "FUNNEL_INGEST_PUBLIC_URL": PUBLIC_URL,
        "FUNNEL_INGEST_MAX_BODY": str(MAX_BODY),
        "FUNNEL_SECRETS_DIR": str(secrets_dir),
        "FUNNEL_PROMETHEUS_RETENTION_TIME": "123d",
        "FUNNEL_PROMETHEUS_RETENTION_SIZE": "3GB",
        "FUNNEL_REMOTE_WRITE_URL": sink.remote_write.url,
        "FUNNEL_REMOTE_WRITE_USERNAME": "funnel",
    }


def time_compressed(tmp: Path) -> tuple[list[Path], Path]:
    """Copies of the shipped rules and Alertmanager template with every `for:` at 0s and
    group_wait/group_interval at 1s, so an alert travels in seconds (also when a slow scrape
    under load made it flap before); nothing else changes."""
    rules = []
    for path in sorted((REPO / "prometheus/rules").glob("*.yml")):
        copy_path = tmp / path.name
        copy_path.write_text(re.sub(r"(?m)^(\s+for:) \d+[smh]$", r"\1 0s", path.read_text()))
        rules.append(copy_path)
    template = tmp / "alertmanager.yml"
    text = (REPO / "prometheus/alertmanager.yml").read_text()
    assert "group_wait: 30s" in text and "group_interval: 5m" in text
    for shipped in ("group_wait: 30s", "group_interval: 5m"):
        text = text.replace(shipped, shipped.split(":")[0] + ": 1s")
    template.write_text(text)
    return rules, template


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    remote_write = RemoteWriteSink()
    with AlertSink() as sink:
        sink.remote_write = remote_write
        env_file = write_env_file(REPO / ".env.example", tmp / ".env", env_values(tmp, sink))
        rules, template = time_compressed(tmp)
        with Stack(COMPOSE_FILE, env_file, tmp, rule_files=rules, alertmanager_template=template) as running:
            running.sink = sink
            for name in ("ingest", "adapt", "worker-1", "worker-2"):  # their compose healthchecks
                wait_until(lambda n=name: running.healthy(n), 180, interval=1, what=f"{name} healthy",
                           show=lambda n=name: running.processes[n].log_tail(15))
            wait_until(lambda: answers(running, "alertmanager", 9093, "/-/ready"), 60,
                       what="alertmanager ready", show=lambda: running.processes["alertmanager"].log_tail(15))
            yield running
    remote_write.close()


def answers(stack: Stack, service: str, port: int, path: str) -> bool:
    try:
        stack.get(service, port, path)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------ helpers
def post(stack: Stack, path: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        stack.url("ingest", 8000, path), data=body, method="POST",
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def send_hubspot(stack: Stack, body: bytes) -> int:
    ts = str(int(time.time() * 1000))
    signature = hubspot.signature_v3(HUBSPOT_SECRET, "POST", PUBLIC_URL + "/webhooks/hubspot", body, ts)
    return post(stack, "/webhooks/hubspot", body,
                {"X-HubSpot-Signature-v3": signature, "X-HubSpot-Request-Timestamp": ts})


def send_pipedrive(stack: Stack, body: bytes) -> int:
    auth = base64.b64encode(PIPEDRIVE_AUTH.encode()).decode()
    return post(stack, "/webhooks/pipedrive", body, {"Authorization": f"Basic {auth}"})


def worker_metrics(stack: Stack, name: str) -> dict | None:
    """A worker's /metrics (the Stack.get timeout), None when it does not answer."""
    return scrape(stack.url(name, 6066, "/metrics"), timeout=5)


def worker_samples(stack: Stack) -> dict | None:
    found = []
    for name in ("worker-1", "worker-2"):
        samples = worker_metrics(stack, name)
        if samples is None:
            return None
        found.append(samples)
    return merged(found)


def prom_value(stack: Stack, query: str) -> float | None:
    path = "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    try:
        result = json.loads(stack.get("prometheus", 9090, path))["data"]["result"]
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None


WON_USD = 'pipeline_currency:funnel_won_revenue:sum{pipeline="default",currency="USD"}'


# ------------------------------------------------------------------ the stack as composed
def test_the_topology_is_complete_and_kafka_init_created_every_topic(stack):
    assert topology_problems(stack.compose) == []
    raw = {"crm.raw.hubspot", "crm.raw.pipedrive", "crm.raw.salesforce", "crm.raw.debezium"}
    assert raw | {"crm.events", "crm.events.dlq", "funnel.kpis", "funnel.alerts"} <= stack.created_topics
    # Prometheus scrapes every process that serves /metrics, and each answers
    targets = json.loads(stack.get("prometheus", 9090, "/api/v1/targets"))["data"]["activeTargets"]
    jobs = {t["labels"]["job"] for t in targets}
    assert {"funnel-kpi", "funnel-ingest", "funnel-adapt", "prometheus", "alertmanager"} <= jobs
    wait_until(lambda: prom_value(stack, 'count(up{job=~"funnel-.*"} == 1)') == 4, 60,
               what="workers, receiver and adapter scraped")
    # the adapter's raw-topic lag (FunnelRawTopicLagHigh): one series per raw partition it reads
    partitions = len(raw) * int(stack.env["FUNNEL_PARTITIONS"])
    wait_until(lambda: prom_value(stack, "count(funnel_adapt_consumer_lag_messages)") == partitions, 60,
               what="the adapter's lag of every raw partition")


def test_signed_webhooks_reach_the_kpis_the_rules_and_redis(stack):
    hs = [raw(b) for b in fixture("hubspot_session.json")["bodies"]]
    pd = [raw(b) for b in fixture("pipedrive_session.json")["bodies"]]
    expected = sum(len(hubspot.adapt(b, CTX).events) for b in hs)
    expected += sum(len(pipedrive.adapt(b, CTX).events) for b in pd)
    assert [send_hubspot(stack, b) for b in hs] == [204] * len(hs)
    assert [send_pipedrive(stack, b) for b in pd] == [204] * len(pd)

    samples = wait_until(
        lambda: (s := worker_samples(stack)) and total(s, "funnel_events_total") >= expected and s,
        90, what=f"{expected} events counted by the workers",
        show=lambda: stack.processes["adapt"].log_tail(10))
    assert total(samples, "funnel_events_total") == expected
    assert total(samples, "funnel_events_total", outcome="rejected") == 0
    lag = 'sum(funnel_adapt_consumer_lag_messages{topic=~"crm.raw.(hubspot|pipedrive)"})'
    wait_until(lambda: prom_value(stack, lag) == 0, 30, what="no raw-topic lag left")
    won = total(samples, "funnel_won_revenue", pipeline="default", currency="USD")
    assert won == 7000  # HubSpot's deal (owner 111) 5,000 + Pipedrive's deal 1 2,000
    wait_until(lambda: prom_value(stack, WON_USD) == won, 60, what="the recording rule",
               show=lambda: prom_value(stack, WON_USD))
    # the funnel config is the mounted host file, not the image's
    target = 'pipeline_currency_period:funnel_revenue_target:max{currency="USD",period="quarter"}'
    assert prom_value(stack, target) == QUARTER_TARGET

    # webhook -> board latency: one new won deal, from the POST to the worker /metrics and to
    # the recording rule in Prometheus (scrape and evaluation every 1 s here, 15 s as shipped)
    body = copy.deepcopy(fixture("pipedrive_session.json")["bodies"][-1])
    body["meta"].update(id=str(uuid.uuid4()), entity_id="9001", correlation_id=str(uuid.uuid4()))
    body["data"].update(id=9001, title="Deal 9001", value=12345)
    body["previous"].update(value=None, currency=None, owner_id=None)  # set as it was won
    sent = time.monotonic()
    assert send_pipedrive(stack, raw(body)) == 204
    wait_until(lambda: (s := worker_samples(stack))
               and total(s, "funnel_won_revenue", pipeline="default", currency="USD") == won + 12345,
               60, interval=0.02, what="the new deal on the workers' /metrics")
    on_metrics = time.monotonic() - sent
    wait_until(lambda: prom_value(stack, WON_USD) == won + 12345, 60, interval=0.05,
               what="the new deal in the recording rule")
    on_rules = time.monotonic() - sent
    print(f"\nwebhook -> worker /metrics {on_metrics:.2f} s; -> Prometheus recording rule "
          f"{on_rules:.2f} s (1 s scrape/evaluation; add up to 2 x 15 s as shipped)")

    # the workers' Redis sink writes through the password-protected redis
    password = stack.env["REDIS_PASSWORD"]
    client = redis.Redis(host="127.0.0.1", port=stack.port("redis", 6379), password=password)
    wait_until(lambda: client.zscore("funnel:leaderboard:default", "pipedrive:user:18487521") == 14345,
               30, what="the leaderboard in Redis")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=stack.port("redis", 6379)).get("x")


def test_receiver_settings_of_env_reach_the_process(stack):
    body = raw(fixture("hubspot_session.json")["bodies"][0])
    ts = str(int(time.time() * 1000))
    local = stack.url("ingest", 8000, "/webhooks/hubspot")  # signed for the wrong URL
    signature = hubspot.signature_v3(HUBSPOT_SECRET, "POST", local, body, ts)
    assert post(stack, "/webhooks/hubspot", body,
                {"X-HubSpot-Signature-v3": signature, "X-HubSpot-Request-Timestamp": ts}) == 401
    assert send_pipedrive(stack, b"{" + b" " * MAX_BODY + b"}") == 413


def test_an_edited_config_file_takes_effect_on_restart(stack):
    config = Path(stack.env["FUNNEL_CONFIG_FILE"])
    config.write_text(config.read_text().replace(f"quarter: {QUARTER_TARGET}", "quarter: 4200000", 1))
    for name in ("worker-1", "worker-2"):  # docker compose restart worker-1 worker-2 (no build)
        stack.restart(name)
    for name in ("worker-1", "worker-2"):
        wait_until(lambda n=name: stack.healthy(n), 120, interval=1, what=f"{name} healthy again")

    def targets():
        values = []
        for name in ("worker-1", "worker-2"):
            samples = worker_metrics(stack, name)
            if samples is None:
                return None
            values.append(total(samples, "funnel_revenue_target", currency="USD", period="quarter"))
        return values

    wait_until(lambda: targets() == [4_200_000, 4_200_000], 60, what="the new quarter target on both workers",
               show=targets)


def test_an_alert_travels_prometheus_alertmanager_to_the_webhook_receiver(stack):
    adapter = stack.address("adapt", "6067")
    stack.processes["adapt"].stop()  # the adapter is gone: FunnelEdgeDown (for: 0s here)

    def delivered():
        return [a for a in stack.sink.alerts("/alerts")
                if a["labels"].get("alertname") == "FunnelEdgeDown" and a["status"] == "firing"
                and a["labels"].get("instance") == adapter]

    alert = wait_until(delivered, 60, what="FunnelEdgeDown at the webhook receiver",
                       show=lambda: (stack.get("prometheus", 9090, "/api/v1/alerts")[-1500:],
                                     stack.processes["prometheus"].log_tail(5),
                                     stack.processes["alertmanager"].log_tail(5)))[0]
    assert alert["labels"]["job"] == "funnel-adapt"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOKS}/docs/runbooks/FunnelEdgeDown.md"
    assert alert["generatorURL"].startswith("http://prometheus.funnel.test:9090/")
    _, headers, notification = next(r for r in stack.sink.received if r[0] == "/alerts")
    assert headers["Authorization"] == f"Bearer {WEBHOOK_TOKEN}"
    assert notification["externalURL"] == "http://alertmanager.funnel.test:9093"


def kpis_status(stack: Stack, worker: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(stack.url(worker, 6066, "/kpis"), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_default_profile_runs_the_bundled_kafka_and_no_one_off(stack):
    assert stack.profiles == {"kafka"}  # COMPOSE_PROFILES of .env.example
    assert {"kafka", "kafka-init"} <= stack.active and "backfill" not in stack.active
    assert stack.broker is not None and stack.created_topics
    assert "backfill" not in stack.processes


def test_the_kpi_api_is_closed_by_the_token_file(stack):
    for worker in ("worker-1", "worker-2"):
        assert kpis_status(stack, worker, None) == 401
        assert kpis_status(stack, worker, "wrong-" + API_TOKEN) == 401
        assert kpis_status(stack, worker, API_TOKEN) == 200


def test_prometheus_retention_and_remote_write_come_from_env(stack):
    info = json.loads(stack.get("prometheus", 9090, "/api/v1/status/runtimeinfo"))["data"]
    assert info["storageRetention"] == "123d or 3GiB"
    pushes = wait_until(lambda: stack.sink.remote_write.pushes, 60, what="a remote_write push",
                        show=lambda: stack.processes["prometheus"].log_tail(10))
    path, headers, size = pushes[0]
    headers = {name.lower(): value for name, value in headers.items()}
    assert path == "/api/v1/push" and size > 0, pushes[0]
    assert headers["content-encoding"] == "snappy", headers
    assert headers["x-prometheus-remote-write-version"].startswith("0."), headers
    expected = base64.b64encode(f"funnel:{REMOTE_WRITE_PASSWORD}".encode()).decode()
    assert headers["authorization"] == f"Basic {expected}"


# ------------------------------------------------------------------ what the harness refuses
def compose_with(tmp_path: Path, edit) -> Path:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    edit(doc)
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def filled_env(tmp_path: Path, **drop: bool) -> Path:
    values = {"GRAFANA_ADMIN_USER": "a", "GRAFANA_ADMIN_PASSWORD": "b", "REDIS_PASSWORD": "c",
              "FUNNEL_RUNBOOK_BASE_URL": RUNBOOKS}
    for name in drop:
        values[name] = ""
    return write_env_file(REPO / ".env.example", tmp_path / ".env", values)


def test_without_the_adapter_service_the_harness_refuses_the_stack(tmp_path):
    compose = compose_with(tmp_path, lambda doc: doc["services"].pop("adapt"))
    with pytest.raises(ComposeError, match=r"crm\.raw\.hubspot is written by ingest and read by no service"):
        Stack(compose, filled_env(tmp_path), tmp_path).preflight()


def test_a_wrong_command_is_refused(tmp_path):
    def rename(doc):
        doc["services"]["adapt"]["command"] = ["funnel-kpi", "normalize"]
    compose = compose_with(tmp_path, rename)
    with pytest.raises(ComposeError, match="funnel-kpi does not accept funnel-kpi normalize"):
        Stack(compose, filled_env(tmp_path), tmp_path).preflight()


def test_a_missing_variable_is_refused_like_compose_does(tmp_path):
    with pytest.raises(ComposeError, match="required variable REDIS_PASSWORD"):
        Stack(COMPOSE_FILE, filled_env(tmp_path, REDIS_PASSWORD=True), tmp_path)
    with pytest.raises(ComposeError, match="required variable FUNNEL_RUNBOOK_BASE_URL"):
        load_compose(COMPOSE_FILE, read_env_file(filled_env(tmp_path, FUNNEL_RUNBOOK_BASE_URL=True)))


def test_a_variable_missing_from_a_service_fails_the_live_run(tmp_path):
    """FUNNEL_ADAPT_PORT removed from the adapter: it serves on its default port (or fails to
    bind it), not the one compose exposes, healthchecks and Prometheus scrape: never healthy."""
    def drop(doc):
        del doc["services"]["adapt"]["environment"]["FUNNEL_ADAPT_PORT"]
    compose = compose_with(tmp_path, drop)
    running = Stack(compose, filled_env(tmp_path), tmp_path).start(only={"adapt"})
    with running, pytest.raises((TimeoutError, ComposeError), match="adapt"):
        # deterministic: the healthcheck reads FUNNEL_ADAPT_PORT, which the service lacks
        wait_until(lambda: running.healthy("adapt"), 15, interval=1, what="adapt healthy")


# ------------------------------------------------------------------ a managed Kafka, the backfill
def shared_dir() -> Path:
    """A working directory the image's user (``nobody`` when the tests run as root) can reach:
    pytest's own temporary directories are private to the test user."""
    path = Path(tempfile.mkdtemp(prefix="funnel-compose-"))
    path.chmod(0o755)
    return path


def test_a_managed_setup_starts_without_the_bundled_kafka(tmp_path):
    """COMPOSE_PROFILES empty and FUNNEL_BROKER at a broker outside the stack (here an embedded
    one standing in for the managed cluster): kafka and kafka-init are not started, the
    receiver, the adapter and a worker start anyway (their wait is `required: false`) and work
    against that broker, and the API stays closed."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "api_token").write_text(API_TOKEN + "\n")
    with EmbeddedBroker(log_path=tmp_path / "managed-kafka.log") as managed:
        env_file = write_env_file(REPO / ".env.example", tmp_path / ".env", {
            "GRAFANA_ADMIN_USER": "a", "GRAFANA_ADMIN_PASSWORD": "b", "REDIS_PASSWORD": "c",
            "FUNNEL_RUNBOOK_BASE_URL": RUNBOOKS, "COMPOSE_PROFILES": "",
            "FUNNEL_BROKER": managed.url, "FUNNEL_PARTITIONS": "2",
            "FUNNEL_PIPEDRIVE_BASIC_AUTH": PIPEDRIVE_AUTH, "FUNNEL_SECRETS_DIR": str(secrets_dir)})
        running = Stack(COMPOSE_FILE, env_file, tmp_path)
        assert running.profiles == set()
        assert {"kafka", "kafka-init", "backfill"}.isdisjoint(running.active)
        with running.start(only={"ingest", "adapt", "worker-1"}):
            assert running.broker is None and running.created_topics == set()
            assert running.processes["worker-1"].env["FUNNEL_BROKER"] == managed.url
            for name in ("ingest", "adapt", "worker-1"):
                wait_until(lambda n=name: running.healthy(n), 180, interval=1, what=f"{name} healthy",
                           show=lambda n=name: running.processes[n].log_tail(15))
            body = raw(fixture("pipedrive_session.json")["bodies"][0])
            assert send_pipedrive(running, body) == 204  # stored on the managed broker
            assert kpis_status(running, "worker-1", None) == 401
            assert kpis_status(running, "worker-1", API_TOKEN) == 200


def test_a_dependency_a_profile_leaves_out_must_not_be_required(tmp_path):
    """What Compose refuses: with the bundled Kafka off, a service that needs kafka-init
    without `required: false` cannot start."""
    def required(doc):
        doc["services"]["adapt"]["depends_on"] = {
            "kafka-init": {"condition": "service_completed_successfully"}}
    compose = compose_with(tmp_path, required)
    env = write_env_file(REPO / ".env.example", tmp_path / ".env", {
        "GRAFANA_ADMIN_USER": "a", "GRAFANA_ADMIN_PASSWORD": "b", "REDIS_PASSWORD": "c",
        "FUNNEL_RUNBOOK_BASE_URL": RUNBOOKS, "COMPOSE_PROFILES": "", "FUNNEL_BROKER": "kafka://x.test:9092"})
    with pytest.raises(ComposeError, match="adapt depends on kafka-init, which the active profiles"):
        Stack(compose, env, tmp_path).preflight()
    Stack(COMPOSE_FILE, env, tmp_path).preflight()  # as shipped: required: false
    # the managed setup that forgot FUNNEL_BROKER: the services would look for the bundled Kafka
    forgot = write_env_file(REPO / ".env.example", tmp_path / ".env", {
        "GRAFANA_ADMIN_USER": "a", "GRAFANA_ADMIN_PASSWORD": "b", "REDIS_PASSWORD": "c",
        "FUNNEL_RUNBOOK_BASE_URL": RUNBOOKS, "COMPOSE_PROFILES": ""})
    with pytest.raises(ComposeError, match="leave the bundled Kafka out"):
        Stack(COMPOSE_FILE, forgot, tmp_path).service_env("adapt")


def test_the_backfill_service_resumes_from_its_volume_as_the_image_user():
    """`docker compose run --rm backfill hubspot --hubspot-api-url <local HubSpot>` as a local
    process with the service's environment, as the image's user in a directory it cannot write:
    the checkpoint lands on the backfill-state volume, a killed run resumes from it, the finished
    run clears it. Without the service's FUNNEL_BACKFILL_STATE_DIR (the setting's relative default
    `data`, what the image used before issue 24) the same run cannot write its checkpoint."""
    from .crm_servers import TOKEN, HubSpotServer
    from .test_backfill_e2e import many_deals

    work = shared_dir()
    try:
        secrets_dir = work / "secrets"
        secrets_dir.mkdir(mode=0o755)
        (secrets_dir / "hubspot_access_token").write_text(TOKEN + "\n")
        (secrets_dir / "hubspot_access_token").chmod(0o644)
        env_file = write_env_file(REPO / ".env.example", work / ".env", {
            "GRAFANA_ADMIN_USER": "a", "GRAFANA_ADMIN_PASSWORD": "b", "REDIS_PASSWORD": "c",
            "FUNNEL_RUNBOOK_BASE_URL": RUNBOOKS, "FUNNEL_PARTITIONS": "2",
            "FUNNEL_SECRETS_DIR": str(secrets_dir)})
        doc = many_deals()
        with Stack(COMPOSE_FILE, env_file, work).start(only=set()) as running, \
                HubSpotServer(doc, page_size=2) as server:
            assert "backfill" not in running.processes  # a one-off: `run`, not `up`
            args = ("hubspot", "--hubspot-api-url", server.url, "--backfill-rate", "4/1")
            first = running.run("backfill", *args)
            state = Path(first.env["FUNNEL_BACKFILL_STATE_DIR"])
            assert state == work / "volumes" / "backfill-state"
            checkpoint = state / "backfill-hubspot.json"
            wait_until(lambda: checkpoint.exists() and json.loads(checkpoint.read_text())["deals"] >= 6, 90,
                       what="a checkpoint on the volume", show=lambda: first.log_tail(10))
            first.process.kill()
            first.wait(10)
            if os.geteuid() == 0:  # written by the image's user, not by root
                assert checkpoint.stat().st_uid != 0
            stopped_at = json.loads(checkpoint.read_text())
            assert stopped_at["deals"] < len(doc["deals"])
            second = running.run("backfill", *args)
            assert second.wait(180) == 0, second.log_tail(20)
            assert f"resumed after {stopped_at['cursor']}" in second.log_path.read_text()
            assert not checkpoint.exists()  # done: the next run starts over

            # the image's default (a relative `data` in the root-owned /app): no checkpoint
            del running.services["backfill"]["environment"]["FUNNEL_BACKFILL_STATE_DIR"]
            (work / "backfill.log").unlink()
            default = running.run("backfill", *args)
            assert default.wait(180) != 0
            assert "Permission denied" in default.log_path.read_text(), default.log_tail(20)
    finally:
        shutil.rmtree(work, ignore_errors=True)
