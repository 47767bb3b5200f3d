"""Alerts reach people: prometheus/alertmanager.yml rendered by prometheus/alertmanager-render.sh
(the alertmanager service's entrypoint) and the real Alertmanager delivering with it.

An integration whose secret file (or .env value) is empty is left out, so a first start needs
none; every rendering passes `amtool check-config`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from streams.tools.broker import free_port

from .alert_sink import AlertSink
from .conftest import wait_until

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "prometheus/alertmanager.yml"
RENDER = REPO / "prometheus/alertmanager-render.sh"
EMAIL = {
    "ALERTMANAGER_EMAIL_TO": "sales-ops@corp.test",
    "ALERTMANAGER_EMAIL_FROM": "alerts@corp.test",
    "ALERTMANAGER_SMTP_SMARTHOST": "smtp.corp.test:587",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: make tools (Debian prometheus-alertmanager)")
    return path


def render_env(folder: Path, binary: str = "/bin/true", **env: str) -> dict[str, str]:
    """The entrypoint's environment: the template, the secrets folder, Alertmanager's binary."""
    return {"PATH": "/usr/bin:/bin", "ALERTMANAGER_TEMPLATE": str(TEMPLATE),
            "ALERTMANAGER_FILES": str(folder), "ALERTMANAGER_BIN": binary, **env}


def run_render(config_file: Path, folder: Path, **env: str) -> subprocess.CompletedProcess:
    """The entrypoint with `true` as Alertmanager, writing ``config_file``."""
    return subprocess.run(["/bin/sh", RENDER, f"--config.file={config_file}"],
                          env=render_env(folder, **env), capture_output=True, text=True, timeout=30)


def render(tmp: Path, secrets: dict[str, str] | None = None, **env: str) -> tuple[dict, str]:
    """Run the entrypoint with `true` as Alertmanager: (the rendered config, what it said)."""
    folder = tmp / "secrets"
    folder.mkdir(exist_ok=True)
    for name, value in (secrets or {}).items():
        (folder / name).write_text(value)
    rendered = tmp / "rendered.yml"
    res = run_render(rendered, folder, **env)
    assert res.returncode == 0, res.stderr
    check = subprocess.run([tool("amtool"), "check-config", rendered], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    return yaml.safe_load(rendered.read_text()), res.stderr


def receivers(config: dict) -> dict[str, dict]:
    return {r["name"]: r for r in config["receivers"]}


def test_the_shipped_template_passes_amtool_as_it_is():
    res = subprocess.run([tool("amtool"), "check-config", TEMPLATE], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(receivers(yaml.safe_load(TEMPLATE.read_text()))) == {
        "ui-only", "pagerduty", "slack", "email", "webhook"}


def test_a_first_start_needs_no_integration(tmp_path):
    config, said = render(tmp_path)
    assert set(receivers(config)) == {"ui-only"}
    assert config["route"]["receiver"] == "ui-only"
    assert not config["route"].get("routes")
    assert config["inhibit_rules"] == yaml.safe_load(TEMPLATE.read_text())["inhibit_rules"]
    for name in ("pagerduty", "slack", "email", "webhook"):
        assert f"{name} off" in said


@pytest.mark.parametrize("name, secrets, env", [
    ("pagerduty", {"pagerduty_routing_key": "R0UT1NGKEY\n"}, {}),
    ("slack", {"slack_api_url": "https://hooks.slack.com/services/T0/B0/X\n"}, {}),
    ("email", {}, EMAIL),
    ("webhook", {"webhook_url": "https://alerts.corp.test/in\n"}, {}),
])
def test_each_integration_is_on_exactly_when_configured(tmp_path, name, secrets, env):
    config, said = render(tmp_path, secrets, **env)
    assert set(receivers(config)) == {"ui-only", name}
    assert [r["receiver"] for r in config["route"]["routes"]] == [name]
    assert config["route"]["routes"][0]["continue"] is True
    assert f"{name} on" in said


def test_everything_on_with_values_from_env_and_files_from_the_secrets_folder(tmp_path):
    secrets = {"pagerduty_routing_key": "k", "slack_api_url": "https://hooks.slack.com/x",
               "smtp_password": "pw", "webhook_bearer_token": "tok",
               "webhook_url": "https://a.test/x?y=1&z=2|\"q\"\r\n"}
    odd = 'ops "team" \\ & | <alerts@corp.test>'
    config, _ = render(tmp_path, secrets, **{**EMAIL, "ALERTMANAGER_EMAIL_FROM": odd,
                                             "ALERTMANAGER_SMTP_USERNAME": "alerts",
                                             "ALERTMANAGER_SLACK_CHANNEL": "#funnel"})
    by_name = receivers(config)
    folder = tmp_path / "secrets"
    email = by_name["email"]["email_configs"][0]
    assert email["from"] == odd  # quoted for YAML, escaped for sed: exactly what .env holds
    assert (email["to"], email["smarthost"], email["auth_username"]) == (
        "sales-ops@corp.test", "smtp.corp.test:587", "alerts")
    assert email["auth_password_file"] == f"{folder}/smtp_password"
    assert by_name["slack"]["slack_configs"][0]["api_url_file"] == f"{folder}/slack_api_url"
    assert by_name["slack"]["slack_configs"][0]["channel"] == "#funnel"
    pagerduty = by_name["pagerduty"]["pagerduty_configs"][0]
    assert pagerduty["routing_key_file"] == f"{folder}/pagerduty_routing_key"
    webhook = by_name["webhook"]["webhook_configs"][0]
    assert webhook["url"] == 'https://a.test/x?y=1&z=2|"q"'  # first line of the file, as written
    assert (tmp_path / "rendered.yml").stat().st_mode & 0o777 == 0o600  # it holds that URL
    assert webhook["http_config"]["authorization"]["credentials_file"] == f"{folder}/webhook_bearer_token"
    # routed by severity: pages for critical only, chat and mail for critical and warning, the
    # webhook gets everything
    routes = {r["receiver"]: r.get("matchers", []) for r in config["route"]["routes"]}
    assert routes == {
        "pagerduty": ['severity="critical"'],
        "slack": ['severity=~"critical|warning"'],
        "email": ['severity=~"critical|warning"'],
        "webhook": [],
    }


def test_an_email_setup_missing_its_sender_is_a_clear_error(tmp_path):
    res = run_render(tmp_path / "out.yml", tmp_path, ALERTMANAGER_EMAIL_TO="a@corp.test")
    assert res.returncode == 1
    assert "e-mail needs ALERTMANAGER_EMAIL_FROM" in res.stderr


def post_alerts(port: int, alerts: list[dict]) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v2/alerts", data=json.dumps(alerts).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def test_the_shipped_config_delivers_by_severity_to_slack_and_the_webhook(tmp_path):
    """The real Alertmanager 0.25 started by the entrypoint with the shipped template (group_wait
    30 s as shipped). Slack's incoming-webhook URL points at a local endpoint too."""
    port = free_port()
    with AlertSink() as sink:
        folder = tmp_path / "secrets"
        folder.mkdir()
        (folder / "slack_api_url").write_text(sink.url("/slack") + "\n")
        (folder / "webhook_bearer_token").write_text("t0ken\n")
        (folder / "webhook_url").write_text(sink.url("/hook") + "\n")
        log = (tmp_path / "alertmanager.log").open("wb")
        process = subprocess.Popen(
            ["/bin/sh", RENDER, f"--config.file={tmp_path / 'rendered.yml'}",
             f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
             "--cluster.listen-address=", "--web.external-url=http://alerts.funnel.test:9093"],
            env=render_env(folder, tool("prometheus-alertmanager")),
            stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            wait_until(lambda: _ready(port), 30, what="alertmanager ready",
                       show=lambda: (tmp_path / "alertmanager.log").read_text()[-800:])
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            post_alerts(port, [
                {"labels": {"alertname": f"Probe{severity.title()}", "severity": severity},
                 "annotations": {"summary": f"a {severity} probe",
                                 "runbook_url": "https://git.test/docs/runbooks/Probe.md"},
                 "startsAt": now}
                for severity in ("critical", "warning", "info")
            ])
            wait_until(lambda: len(sink.alerts("/hook")) >= 3 and len(slack_posts(sink)) >= 2, 90,
                       what="three alerts at the webhook, two at Slack", show=lambda: sink.received)
            time.sleep(2)  # anything misrouted would arrive with the same group_wait
        finally:
            process.terminate()
            process.wait(20)
            log.close()
    assert sorted(a["labels"]["severity"] for a in sink.alerts("/hook")) == ["critical", "info", "warning"]
    hook = next(r for r in sink.received if r[0] == "/hook")
    assert hook[1]["Authorization"] == "Bearer t0ken"
    assert hook[2]["externalURL"] == "http://alerts.funnel.test:9093"
    slack = slack_posts(sink)
    assert len(slack) == 2  # critical and warning, not info
    titles = sorted(body["attachments"][0]["title"] for body in slack)
    assert titles == ["[FIRING] a critical probe", "[FIRING] a warning probe"]
    assert all(body["attachments"][0]["title_link"] == "https://git.test/docs/runbooks/Probe.md"
               for body in slack)


def slack_posts(sink: AlertSink) -> list[dict]:
    return [body for path, _, body in list(sink.received) if path == "/slack"]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
            return True
    except OSError:
        return False
