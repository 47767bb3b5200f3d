"""Alerts reach people: prometheus/alertmanager.yml rendered by prometheus/alertmanager-render.sh
(the alertmanager service's entrypoint) and the real Alertmanager delivering with it.

An integration whose secret file (or .env value) is empty is left out, so a first start needs
none; every rendering passes `amtool check-config`. Every alert of the rules is routed with
`amtool config routes test` in each rendering: sales alerts (team="sales") reach the sales
receivers only, never an on-call one (issue 24).
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
SALES_EMAIL = {
    "ALERTMANAGER_SALES_EMAIL_TO": "sales-leaders@corp.test",
    "ALERTMANAGER_EMAIL_FROM": "alerts@corp.test",
    "ALERTMANAGER_SMTP_SMARTHOST": "smtp.corp.test:587",
}
# integration (as the template's "# begin NAME" and the entrypoint's log name it) -> receiver
RECEIVER = {"pagerduty": "pagerduty", "slack": "slack", "email": "email", "webhook": "webhook",
            "sales_slack": "sales-slack", "sales_email": "sales-email"}
ON_CALL = {"pagerduty", "slack", "email"}
SALES = {"sales-slack", "sales-email"}


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


def routes(route: dict) -> list[dict]:
    """Every route below ``route``, depth first (the order Alertmanager tries them)."""
    out = []
    for child in route.get("routes") or []:
        out += [child, *routes(child)]
    return out


def notified(config: dict) -> list[str]:
    """The receivers some route sends to (ui-only: nobody)."""
    return [r["receiver"] for r in routes(config["route"]) if r["receiver"] != "ui-only"]


def test_the_shipped_template_passes_amtool_as_it_is():
    res = subprocess.run([tool("amtool"), "check-config", TEMPLATE], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert set(receivers(yaml.safe_load(TEMPLATE.read_text()))) == {"ui-only", *RECEIVER.values()}


def test_a_first_start_needs_no_integration(tmp_path):
    config, said = render(tmp_path)
    assert set(receivers(config)) == {"ui-only"}
    assert config["route"]["receiver"] == "ui-only"
    assert notified(config) == []  # the sales route stays, with nobody to tell: the UI only
    assert config["inhibit_rules"] == yaml.safe_load(TEMPLATE.read_text())["inhibit_rules"]
    for name in RECEIVER:
        assert f"alertmanager-render: {name} off:" in said


@pytest.mark.parametrize("name, secrets, env", [
    ("pagerduty", {"pagerduty_routing_key": "R0UT1NGKEY\n"}, {}),
    ("slack", {"slack_api_url": "https://hooks.slack.com/services/T0/B0/X\n"}, {}),
    ("email", {}, EMAIL),
    ("webhook", {"webhook_url": "https://alerts.corp.test/in\n"}, {}),
    ("sales_slack", {"sales_slack_api_url": "https://hooks.slack.com/services/T0/B1/Y\n"}, {}),
    ("sales_email", {}, SALES_EMAIL),
])
def test_each_integration_is_on_exactly_when_configured(tmp_path, name, secrets, env):
    config, said = render(tmp_path, secrets, **env)
    assert set(receivers(config)) == {"ui-only", RECEIVER[name]}
    assert notified(config) == [RECEIVER[name]]
    assert next(r for r in routes(config["route"]) if r["receiver"] == RECEIVER[name])["continue"] is True
    assert f"alertmanager-render: {name} on" in said.splitlines()


def test_everything_on_with_values_from_env_and_files_from_the_secrets_folder(tmp_path):
    secrets = {"pagerduty_routing_key": "k", "slack_api_url": "https://hooks.slack.com/x",
               "smtp_password": "pw", "webhook_bearer_token": "tok",
               "webhook_url": "https://a.test/x?y=1&z=2|\"q\"\r\n",
               "sales_slack_api_url": "https://hooks.slack.com/sales"}
    odd = 'ops "team" \\ & | <alerts@corp.test>'
    config, _ = render(tmp_path, secrets, **{**EMAIL, **SALES_EMAIL, "ALERTMANAGER_EMAIL_FROM": odd,
                                             "ALERTMANAGER_SMTP_USERNAME": "alerts",
                                             "ALERTMANAGER_SLACK_CHANNEL": "#funnel",
                                             "ALERTMANAGER_SALES_SLACK_CHANNEL": "#sales-leaders"})
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
    sales_email = by_name["sales-email"]["email_configs"][0]
    assert (sales_email["to"], sales_email["from"], sales_email["smarthost"]) == (
        "sales-leaders@corp.test", odd, "smtp.corp.test:587")
    assert (sales_email["auth_username"], sales_email["auth_password_file"]) == (
        "alerts", f"{folder}/smtp_password")
    sales_slack = by_name["sales-slack"]["slack_configs"][0]
    assert (sales_slack["api_url_file"], sales_slack["channel"]) == (
        f"{folder}/sales_slack_api_url", "#sales-leaders")
    # the webhook gets everything; sales alerts stop at their own route; on-call is routed by
    # severity: pages for critical only, chat and mail for critical and warning
    top = [(r["receiver"], r.get("matchers", []), r.get("continue", False))
           for r in config["route"]["routes"]]
    assert top == [
        ("webhook", [], True),
        ("ui-only", ['team="sales"'], False),
        ("pagerduty", ['severity="critical"'], True),
        ("slack", ['severity=~"critical|warning"'], True),
        ("email", ['severity=~"critical|warning"'], True),
    ]
    assert [r["receiver"] for r in config["route"]["routes"][1]["routes"]] == ["sales-slack", "sales-email"]


def test_a_sales_email_setup_missing_its_server_is_a_clear_error(tmp_path):
    res = run_render(tmp_path / "out.yml", tmp_path, ALERTMANAGER_SALES_EMAIL_TO="s@corp.test",
                     ALERTMANAGER_EMAIL_FROM="a@corp.test")
    assert res.returncode == 1
    assert "e-mail needs ALERTMANAGER_SMTP_SMARTHOST as host:port" in res.stderr


# ------------------------------------------------------------------ routing, with amtool
def rule_alerts() -> list[dict[str, str]]:
    """The label set each alert of prometheus/rules leaves Prometheus with (alertname, its
    static labels)."""
    out = []
    for path in sorted((REPO / "prometheus/rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            out += [{"alertname": r["alert"], **r["labels"]} for r in group["rules"] if "alert" in r]
    return out


def expected_receivers(labels: dict[str, str], on: set[str]) -> list[str]:
    """The routing policy, written independently of the template: the webhook gets every alert;
    a sales alert goes to the sales receivers and nowhere else; anything else is on-call's, by
    severity. Nobody configured: ui-only."""
    out = ["webhook"] if "webhook" in on else []
    if labels.get("team") == "sales":
        out += [r for r in ("sales-slack", "sales-email") if r in on]
    else:
        severity = labels["severity"]
        out += [r for r in ("pagerduty",) if r in on and severity == "critical"]
        out += [r for r in ("slack", "email") if r in on and severity in ("critical", "warning")]
    return out or ["ui-only"]


def amtool_route(config_file: Path, labels: dict[str, str]) -> list[str]:
    """`amtool config routes test`: the receivers Alertmanager resolves ``labels`` to."""
    res = subprocess.run(
        [tool("amtool"), "config", "routes", "test", f"--config.file={config_file}",
         *(f"{k}={v}" for k, v in labels.items())],
        capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout.strip().split(",")


ALL_SECRETS = {"pagerduty_routing_key": "k", "slack_api_url": "https://hooks.slack.com/x",
               "webhook_url": "https://a.test/hook", "sales_slack_api_url": "https://hooks.slack.com/s"}


@pytest.mark.parametrize("setup, secrets, env", [
    ("everything on", ALL_SECRETS, {**EMAIL, **SALES_EMAIL}),
    ("on-call only", {k: ALL_SECRETS[k] for k in ("pagerduty_routing_key", "slack_api_url")}, EMAIL),
    ("sales only", {"sales_slack_api_url": "https://hooks.slack.com/s"}, SALES_EMAIL),
    ("sales Slack and the webhook", {"sales_slack_api_url": "https://hooks.slack.com/s",
                                     "webhook_url": "https://a.test/hook"}, {}),
    ("nothing", {}, {}),
])
def test_amtool_routes_every_alert_to_its_team(tmp_path, setup, secrets, env):
    config, said = render(tmp_path, secrets, **env)
    on = {RECEIVER[name] for name in RECEIVER if f"alertmanager-render: {name} on" in said.splitlines()}
    assert on == set(notified(config))
    alerts = rule_alerts()
    assert {a["team"] for a in alerts} == {"sales", "ops"}
    got = {a["alertname"]: amtool_route(tmp_path / "rendered.yml", a) for a in alerts}
    assert got == {a["alertname"]: expected_receivers(a, on) for a in alerts}
    for alert in alerts:
        if alert["team"] == "sales":
            assert not ON_CALL & set(got[alert["alertname"]]), f"on-call gets {alert['alertname']}"
    # an alert without a team (a new rule that forgot it) is on-call's, never lost
    assert amtool_route(tmp_path / "rendered.yml", {"alertname": "New", "severity": "critical"}) == \
        expected_receivers({"severity": "critical"}, on)


def test_amtool_verifies_the_shipped_template_and_refuses_a_wrong_expectation():
    """`--verify.receivers` as an operator runs it on the shipped file (every integration on):
    it passes for the right receivers and fails (exit 1) for on-call on a sales alert."""
    labels = ["alertname=FunnelWinRateDrop", "severity=warning", "team=sales", "pipeline=default"]
    base = [tool("amtool"), "config", "routes", "test", f"--config.file={TEMPLATE}"]
    right = subprocess.run([*base, "--verify.receivers=webhook,sales-slack,sales-email", *labels],
                           capture_output=True, text=True, timeout=30)
    assert right.returncode == 0, right.stdout + right.stderr
    wrong = subprocess.run([*base, "--verify.receivers=webhook,slack,email", *labels],
                           capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    page = subprocess.run([*base, "--verify.receivers=webhook,pagerduty,slack,email",
                           "alertname=FunnelWorkerDown", "severity=critical", "team=ops"],
                          capture_output=True, text=True, timeout=30)
    assert page.returncode == 0, page.stdout + page.stderr


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
    30 s as shipped). Both Slack incoming-webhook URLs (on-call's, sales') point at local
    endpoints too: a sales alert reaches the sales channel and the webhook, never on-call's."""
    port = free_port()
    with AlertSink() as sink:
        folder = tmp_path / "secrets"
        folder.mkdir()
        (folder / "slack_api_url").write_text(sink.url("/slack") + "\n")
        (folder / "sales_slack_api_url").write_text(sink.url("/sales-slack") + "\n")
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
            ] + [{"labels": {"alertname": "FunnelWinRateDrop", "severity": "warning", "team": "sales",
                             "pipeline": "default"},
                  "annotations": {"summary": "a sales probe",
                                  "runbook_url": "https://git.test/docs/runbooks/FunnelWinRateDrop.md"},
                  "startsAt": now}])
            wait_until(lambda: len(sink.alerts("/hook")) >= 4 and len(slack_posts(sink)) >= 2
                       and slack_posts(sink, "/sales-slack"), 90,
                       what="four alerts at the webhook, two at on-call's Slack, one at sales'",
                       show=lambda: sink.received)
            time.sleep(2)  # anything misrouted would arrive with the same group_wait
        finally:
            process.terminate()
            process.wait(20)
            log.close()
    assert sorted(a["labels"]["alertname"] for a in sink.alerts("/hook")) == [
        "FunnelWinRateDrop", "ProbeCritical", "ProbeInfo", "ProbeWarning"]
    hook = next(r for r in sink.received if r[0] == "/hook")
    assert hook[1]["Authorization"] == "Bearer t0ken"
    assert hook[2]["externalURL"] == "http://alerts.funnel.test:9093"
    slack = slack_posts(sink)
    assert len(slack) == 2  # critical and warning, not info, not sales
    titles = sorted(body["attachments"][0]["title"] for body in slack)
    assert titles == ["[FIRING] a critical probe", "[FIRING] a warning probe"]
    assert all(body["attachments"][0]["title_link"] == "https://git.test/docs/runbooks/Probe.md"
               for body in slack)
    sales = slack_posts(sink, "/sales-slack")
    assert [body["attachments"][0]["title"] for body in sales] == ["[FIRING] a sales probe"]


def slack_posts(sink: AlertSink, at: str = "/slack") -> list[dict]:
    return [body for path, _, body in list(sink.received) if path == at]


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2):
            return True
    except OSError:
        return False
