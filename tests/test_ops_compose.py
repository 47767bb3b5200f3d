"""docker-compose.yml, Dockerfile and .env.example (operations view, issue 4).

No Docker engine needed: the file is validated against the compose specification schema
(check-jsonschema's vendored copy) and cross-checked against the repository.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from streams.crm.sources.settings import INGEST_SETTINGS

from .compose_harness import dockerfile_user_dirs, interpolate, read_env_file

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML resolves the << merge keys
SERVICES = COMPOSE["services"]
# As `docker compose config` sees it with .env.example's values and its secrets filled in.
FIRST_START_ENV = {
    **read_env_file(REPO / ".env.example"),
    "GRAFANA_ADMIN_USER": "admin",
    "GRAFANA_ADMIN_PASSWORD": "x",
    "REDIS_PASSWORD": "x",
    "FUNNEL_RUNBOOK_BASE_URL": "https://git.example.org/funnel-kpi/blob/main",
}
RESOLVED = interpolate(COMPOSE, FIRST_START_ENV)["services"]
WORKERS = sorted(s for s, d in SERVICES.items() if d.get("command") == ["funnel-kpi", "worker"])
ONE_SHOT = {"kafka-init", "backfill"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|TOKEN|API_KEY|AUTH$", re.I)
INTERPOLATION = re.compile(r"(?<!\$)\$\{(\w+)(?::?[-?][^}]*)?\}")


def test_compose_validates_against_the_compose_specification():
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_services_of_the_stack():
    assert {"kafka", "redis", "ingest", "prometheus", "alertmanager", "grafana"} <= set(SERVICES)
    assert len(WORKERS) >= 2
    assert SERVICES["ingest"]["command"] == ["funnel-kpi", "ingest"]
    assert SERVICES["adapt"]["command"] == ["funnel-kpi", "adapt"]
    assert "version" not in COMPOSE  # obsolete top-level key


def test_kafka_is_kraft_and_consistent():
    env = SERVICES["kafka"]["environment"]
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    listeners = dict(item.split("://") for item in env["KAFKA_LISTENERS"].split(","))
    voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split("@")[1]
    assert listeners[env["KAFKA_CONTROLLER_LISTENER_NAMES"]] == ":" + voter.split(":")[1]
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]] == "kafka:9092"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 1


@pytest.mark.parametrize("name", sorted(set(SERVICES) - ONE_SHOT))
def test_long_running_services_have_healthchecks(name):
    hc = SERVICES[name].get("healthcheck")
    assert hc and hc.get("test"), f"{name} has no healthcheck"
    assert not hc.get("disable")


def test_depends_on_uses_conditions_on_existing_services():
    for name, svc in SERVICES.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        for dep, spec in deps.items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            cond = spec["condition"]
            assert cond in {"service_healthy", "service_started", "service_completed_successfully"}
            if cond == "service_healthy":
                assert SERVICES[dep].get("healthcheck"), f"{dep} has no healthcheck"
            if cond == "service_completed_successfully":
                assert dep in ONE_SHOT
    for w in [*WORKERS, "ingest", "adapt", "backfill"]:
        assert SERVICES[w]["depends_on"]["kafka-init"]["condition"] == ("service_completed_successfully")
    assert SERVICES["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"


def _env_items():
    for name, svc in SERVICES.items():
        env = svc.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key, value in env.items():
            yield name, key, str(value)


def test_no_literal_passwords():
    for name, key, value in _env_items():
        if key.endswith("_FILE") and value.startswith("/run/secrets/"):
            continue  # where a compose secret is mounted: a path, not the secret
        if SECRET_KEY.search(key):
            m = INTERPOLATION.fullmatch(value)
            assert m, f"{name}.{key} must come from .env, got a literal"
            assert ":-" not in value or value.endswith(":-}"), (
                f"{name}.{key}: a default value would be a default password"
            )
        for userinfo in re.findall(r"://[^/@\s]*:(\$\{[^}]*\}|[^@\s/]*)@", value):
            assert INTERPOLATION.fullmatch(userinfo), f"{name}.{key}: password in URL"
    assert "env_file" not in COMPOSE_FILE.read_text() or (REPO / ".env.example").exists()


def test_env_example_documents_every_variable_and_env_is_ignored():
    used = set(INTERPOLATION.findall(json.dumps(COMPOSE)))  # values only, not comments
    example = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^(\w+)=", example, re.M))
    assert used <= documented, f"undocumented: {sorted(used - documented)}"
    # secrets have no value in the example
    for line in example.splitlines():
        m = re.match(r"^(\w+)=(.*)$", line)
        if m and SECRET_KEY.search(m.group(1)):
            assert m.group(2) == "", f"{m.group(1)} has a value in .env.example"
    ignored = (REPO / ".gitignore").read_text().split()
    assert ".env" in ignored


def _bind_mounts():
    for name, svc in RESOLVED.items():
        for vol in svc.get("volumes", []):
            source, target = vol.split(":")[:2]
            if source.startswith((".", "/")):
                yield name, source, target


def test_bind_mounts_exist_in_the_repository():
    mounts = list(_bind_mounts())
    assert mounts
    for name, source, _ in mounts:
        assert (REPO / source).resolve().exists(), f"{name}: {source} missing"
        assert (REPO / source).resolve().is_relative_to(REPO)


def test_grafana_mounts_match_provisioning():
    mounts = {s: t for n, s, t in _bind_mounts() if n == "grafana"}
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((REPO / "grafana/provisioning/dashboards/funnel.yml").read_text())["providers"][
        0
    ]
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    datasource = yaml.safe_load((REPO / "grafana/provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ][0]
    assert datasource["url"] == "http://prometheus:9090"


def test_prometheus_scrapes_every_process_serving_metrics():
    config = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    assert jobs["funnel-ingest"]["static_configs"][0]["targets"] == [
        "ingest:" + SERVICES["ingest"]["environment"]["FUNNEL_INGEST_PORT"]
    ]
    # every replica of a scaled adapter (DNS answers one address per container)
    assert jobs["funnel-adapt"]["dns_sd_configs"] == [
        {"names": ["adapt"], "type": "A", "port": int(SERVICES["adapt"]["environment"]["FUNNEL_ADAPT_PORT"])}
    ]
    assert SERVICES["adapt"]["expose"] == [SERVICES["adapt"]["environment"]["FUNNEL_ADAPT_PORT"]]


def test_prometheus_and_alertmanager_links_and_no_lifecycle_api():
    prometheus = RESOLVED["prometheus"]["command"]
    assert "--web.enable-lifecycle" not in prometheus
    assert "--web.external-url=http://localhost:9090" in prometheus
    assert "--enable-feature=expand-external-labels" in prometheus
    assert SERVICES["prometheus"]["environment"]["FUNNEL_RUNBOOK_BASE_URL"].startswith(
        "${FUNNEL_RUNBOOK_BASE_URL:?"
    )  # every runbook_url is absolute: the base is required
    config = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
    assert config["global"]["external_labels"]["runbook_base_url"] == "${FUNNEL_RUNBOOK_BASE_URL}"
    assert "--web.external-url=http://localhost:9093" in RESOLVED["alertmanager"]["command"]
    for name in ("prometheus", "alertmanager"):  # healthchecks and Grafana keep using /
        assert "--web.route-prefix=/" in RESOLVED[name]["command"]
    assert RESOLVED["grafana"]["environment"]["GF_SERVER_ROOT_URL"] == "http://localhost:3000"


def test_every_receiver_setting_of_env_reaches_the_receiver():
    env = SERVICES["ingest"]["environment"]
    settings = {f"FUNNEL_{name.upper()}" for name in INGEST_SETTINGS if "topic" not in name}
    settings -= {"FUNNEL_INGEST_PORT", "FUNNEL_INGEST_BIND"}  # fixed by the container
    settings |= {"FUNNEL_HUBSPOT_CLIENT_SECRET", "FUNNEL_PIPEDRIVE_BASIC_AUTH"}
    for name in sorted(settings):
        assert INTERPOLATION.fullmatch(str(env.get(name))), f"{name} does not come from .env"
        assert INTERPOLATION.fullmatch(str(env[name])).group(1) == name


def test_funnel_config_is_a_host_file_mounted_into_workers_and_adapter():
    readers = [*WORKERS, "adapt"]
    for name in readers:
        config = RESOLVED[name]["environment"]["FUNNEL_CONFIG"]
        mounts = {t: s for n, s, t in _bind_mounts() if n == name}
        assert mounts[config] == "./models/funnel.yaml"  # the default: works on a first start
        assert any(v.endswith(":ro") for v in RESOLVED[name]["volumes"] if config in v)
    text = COMPOSE_FILE.read_text()
    assert "${FUNNEL_CONFIG_FILE:-./models/funnel.yaml}:/etc/funnel-kpi/funnel.yaml:ro" in text


def test_prometheus_scrapes_every_worker_and_loads_the_rules():
    mounts = {s: t for n, s, t in _bind_mounts() if n == "prometheus"}
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    assert mounts["./prometheus/rules"] == "/etc/prometheus/rules"
    config = yaml.safe_load((REPO / "prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yml"]  # relative to /etc/prometheus
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "funnel-kpi")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    ports = {SERVICES[w]["environment"]["FUNNEL_WEB_PORT"] for w in WORKERS}
    assert targets == {f"{w}:{p}" for w in WORKERS for p in ports}
    am = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert am == ["alertmanager:9093"]
    assert SERVICES["prometheus"]["image"] == "prom/prometheus:v2.42.0"


def test_workers_settings():
    for w in WORKERS:
        env = RESOLVED[w]["environment"]
        assert env["FUNNEL_BROKER"] == "kafka://kafka:9092"  # the bundled Kafka, as .env.example
        assert env["FUNNEL_STORE"] == "rocksdb://"
        assert {"FUNNEL_WEB_PORT", "FUNNEL_DATA_DIR", "FUNNEL_CONFIG", "FUNNEL_REDIS_URL"} <= set(env)
        # each worker keeps its own RocksDB state in its own volume
        data = [v for v in SERVICES[w]["volumes"] if v.endswith(":" + env["FUNNEL_DATA_DIR"])]
        assert len(data) == 1
    volumes = [SERVICES[w]["volumes"][0] for w in WORKERS]
    assert len(set(volumes)) == len(volumes)


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install --no-deps \.$", text, re.M)  # dependencies: tests/test_build.py
    assert re.search(r"^USER (?!root)\w+", text, re.M), "run as an unprivileged user"
    assert "funnel-kpi" in text
    copied = re.findall(r"^COPY (\S+)", text, re.M)
    for src in copied:
        assert (REPO / src).exists(), f"Dockerfile copies missing {src}"


def test_alert_secrets_reach_alertmanager_as_a_compose_secret_needing_no_file():
    """The notification secrets are the compose secret `alertmanager` (the ./secrets folder, which
    the repository holds, so a first start needs no file), mounted where the entrypoint reads."""
    resolved = interpolate(COMPOSE, FIRST_START_ENV)
    declared = resolved["secrets"]["alertmanager"]
    assert declared == {"file": "./secrets"}
    assert (REPO / declared["file"]).is_dir()
    service = RESOLVED["alertmanager"]
    assert service["secrets"] == [{"source": "alertmanager", "target": "/run/secrets/alertmanager"}]
    assert service["environment"]["ALERTMANAGER_FILES"] == "/run/secrets/alertmanager"
    assert not any("secrets" in str(v) for v in service.get("volumes", []))
    template = (REPO / "prometheus/alertmanager.yml").read_text()
    files = set(re.findall(r"/run/secrets/alertmanager/(\w+)", template))
    files |= set(re.findall(r"# from secret ([a-z_]+)$", template, re.M))
    documented = set(re.findall(r"^\| `(\w+)` \|", (REPO / "secrets/README.md").read_text(), re.M))
    assert files == {"pagerduty_routing_key", "slack_api_url", "smtp_password",
                     "webhook_bearer_token", "webhook_url", "sales_slack_api_url"}
    # and the folder's other files: the API token, the CRM tokens, remote_write credentials
    used = set(re.findall(r"/run/secrets/crm/(\w+)", COMPOSE_FILE.read_text()))
    render = (REPO / "prometheus/prometheus-render.sh").read_text()
    used |= set(re.findall(r"\$secrets/(remote_write_\w+)", render)) | {"api_token"}
    assert {"hubspot_access_token", "pipedrive_api_token", "salesforce_access_token",
            "remote_write_password", "remote_write_bearer_token"} <= used
    missing = sorted((files | used) - documented)
    assert not missing, f"undocumented in secrets/README.md: {missing}"


# ------------------------------------------------------------------ issue 24: profiles, backfill, API
def test_the_bundled_kafka_is_a_profile_the_example_env_turns_on():
    """kafka and kafka-init in the profile `kafka` (on in .env.example), backfill in `tools`; a
    service waits for one that may be off only with `required: false`, or Compose refuses to
    start it in a managed setup (COMPOSE_PROFILES without kafka)."""
    profiled = {name: svc["profiles"] for name, svc in SERVICES.items() if "profiles" in svc}
    assert {"kafka": ["kafka"], "kafka-init": ["kafka"], "backfill": ["tools"]}.items() <= profiled.items()
    assert [n for n, p in profiled.items() if "kafka" in p] == ["kafka", "kafka-init"]
    assert read_env_file(REPO / ".env.example")["COMPOSE_PROFILES"] == "kafka"
    for name, svc in SERVICES.items():
        for dep, spec in svc.get("depends_on", {}).items():
            if set(SERVICES[dep].get("profiles", [])) - set(svc.get("profiles", [])):
                assert spec.get("required") is False, f"{name} needs {dep}, which a profile may leave off"
    # every client takes the broker from .env, the bundled one by default
    clients = [n for n, s in RESOLVED.items() if "FUNNEL_BROKER" in s.get("environment", {})]
    assert set(clients) >= {*WORKERS, "ingest", "adapt", "backfill"}
    for name in clients:
        assert SERVICES[name]["environment"]["FUNNEL_BROKER"] == "${FUNNEL_BROKER:-kafka://kafka:9092}"


def test_the_backfill_service_keeps_its_checkpoints_on_a_volume_its_user_owns():
    svc = RESOLVED["backfill"]
    assert svc["entrypoint"] == ["funnel-kpi", "backfill"]  # docker compose run --rm backfill hubspot
    state = svc["environment"]["FUNNEL_BACKFILL_STATE_DIR"]
    assert state.startswith("/")  # not the relative default `data` in the root-owned /app
    volumes = {v.split(":")[1]: v.split(":")[0] for v in svc["volumes"]}
    assert volumes[state] in COMPOSE["volumes"], "the checkpoints need a named volume"
    user, owned = dockerfile_user_dirs()
    assert user == "funnel" and state in owned, "the image must create the directory for its user"
    dockerfile = (REPO / "Dockerfile").read_text()
    assert f"FUNNEL_BACKFILL_STATE_DIR={state}" in dockerfile  # `docker run` without compose too
    for crm in ("hubspot_access_token", "pipedrive_api_token", "salesforce_access_token"):
        assert svc["environment"][f"FUNNEL_{crm.upper()}_FILE"] == f"/run/secrets/crm/{crm}"
    assert svc["secrets"] == [{"source": "crm", "target": "/run/secrets/crm"}]


def test_the_kpi_api_is_closed_in_the_stack():
    """The workers read the /kpis bearer token from the compose secret api-token, one required
    file: Compose refuses to start without it, so the API is never open (an empty
    FUNNEL_API_TOKEN would open it, and both set is refused: only the file is passed)."""
    resolved = interpolate(COMPOSE, FIRST_START_ENV)
    assert resolved["secrets"]["api-token"] == {"file": "./secrets/api_token"}
    for w in WORKERS:
        env = RESOLVED[w]["environment"]
        assert "FUNNEL_API_TOKEN" not in env
        assert RESOLVED[w]["secrets"] == [{"source": "api-token", "target": env["FUNNEL_API_TOKEN_FILE"]}]
    assert not any("API_TOKEN" in key for name in set(SERVICES) - set(WORKERS)
                   for key in RESOLVED[name].get("environment", {}) if "PIPEDRIVE" not in key)


def test_prometheus_retention_and_remote_write_are_env_settings():
    command = RESOLVED["prometheus"]["command"]
    assert "--storage.tsdb.retention.time=400d" in command
    assert "--storage.tsdb.retention.size=20GB" in command
    custom = interpolate(COMPOSE, {**FIRST_START_ENV, "FUNNEL_PROMETHEUS_RETENTION_TIME": "2y",
                                   "FUNNEL_PROMETHEUS_RETENTION_SIZE": "500GB"})["services"]["prometheus"]
    assert {"--storage.tsdb.retention.time=2y",
            "--storage.tsdb.retention.size=500GB"} <= set(custom["command"])
    env = SERVICES["prometheus"]["environment"]
    for name in ("FUNNEL_REMOTE_WRITE_URL", "FUNNEL_REMOTE_WRITE_USERNAME"):
        assert env[name] == f"${{{name}:-}}"  # empty: off
    assert RESOLVED["prometheus"]["entrypoint"] == ["/bin/sh", "/etc/prometheus/prometheus-render.sh"]
    assert RESOLVED["prometheus"]["secrets"] == [
        {"source": "prometheus", "target": "/run/secrets/prometheus"}]


def test_every_setting_an_entrypoint_reads_reaches_its_service():
    for service, script, prefix in (("alertmanager", "alertmanager-render.sh", "ALERTMANAGER_"),
                                    ("prometheus", "prometheus-render.sh", "FUNNEL_REMOTE_WRITE_")):
        text = (REPO / "prometheus" / script).read_text()
        read = set(re.findall(rf"\b({prefix}[A-Z_]+)\b", text)) - {"ALERTMANAGER_BIN"}
        env = SERVICES[service]["environment"]
        assert read <= set(env), f"{service}: {sorted(read - set(env))} not passed"
