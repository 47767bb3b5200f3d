"""``funnel-kpi check-config`` as an operator runs it before a deploy: against a real broker, the
machine's Redis and a CRM API server; every check a line, a problem exit 2 with one stderr line."""

from __future__ import annotations

import asyncio
import os

import pytest

from streams.kafka import topics
from streams.kafka.topics import ensure_topics
from streams.tools.broker import EmbeddedBroker, free_port

from .crm_servers import TOKEN, PipedriveServer
from .test_backfill_api import pipedrive_doc
from .test_kafka_tls import cli

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("broker") / "broker.log") as running:
        yield running


def check(env: dict[str, str]) -> tuple[int, list[str], list[str]]:
    clean = {key: value for key, value in os.environ.items() if not key.startswith("FUNNEL_")}
    result = cli(["check-config"], {**clean, "FUNNEL_KAFKA_CONNECT_TIMEOUT": "3", **env}, timeout=120)
    return result.returncode, result.stdout.splitlines(), result.stderr.strip().splitlines()


def line(lines: list[str], level: str, starts: str) -> str:
    found = [text for text in lines if text.startswith(f"{level:5} {starts}")]
    assert len(found) == 1, lines
    return found[0]


def test_a_deployable_setup_passes_every_check(broker, tmp_path):
    with PipedriveServer(pipedrive_doc()) as crm:
        code, out, err = check({
            "FUNNEL_BROKER": broker.url, "FUNNEL_APP_ID": "check-ok", "FUNNEL_PARTITIONS": "4",
            "FUNNEL_REDIS_URL": "redis://127.0.0.1:6379/0",
            "FUNNEL_PIPEDRIVE_API_URL": crm.url, "FUNNEL_PIPEDRIVE_API_TOKEN": TOKEN,
        })
    assert (code, err) == (0, []), out
    assert "app id check-ok, 4 partitions" in line(out, "ok", "settings:")
    assert "pipelines default (6 stages)" in line(out, "ok", "funnel config:")
    assert line(out, "ok", f"Kafka at {broker.url} (PLAINTEXT): logged in")
    wanted = topics.worker_topics("check-ok", 4)
    assert f"0 of the worker's {len(wanted)} present; the worker creates" in line(out, "ok", "topics:")
    assert "answers PING" in line(out, "ok", "Redis:")
    assert "the API accepts the token:" in line(out, "ok", "pipedrive:")
    assert line(out, "skip", "hubspot: FUNNEL_HUBSPOT_ACCESS_TOKEN(_FILE) is not set")
    assert out[-1] == "all checks passed"
    # nothing was created: an auto-creating broker (Tansu) would make any topic described
    code, out, _ = check({"FUNNEL_BROKER": broker.url, "FUNNEL_APP_ID": "check-ok",
                          "FUNNEL_PARTITIONS": "4"})
    assert code == 0 and f"0 of the worker's {len(wanted)} present" in line(out, "ok", "topics:")


def test_each_problem_is_a_fail_line_and_one_stderr_line_with_exit_2(broker, tmp_path):
    asyncio.run(ensure_topics(broker.url, topics.worker_topics("check-bad", 2), replication_factor=1,
                              app_id="check-bad"))
    with PipedriveServer(pipedrive_doc()) as crm:
        code, out, err = check({
            "FUNNEL_BROKER": broker.url, "FUNNEL_APP_ID": "check-bad", "FUNNEL_PARTITIONS": "4",
            "FUNNEL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
            "FUNNEL_PIPEDRIVE_API_URL": crm.url, "FUNNEL_PIPEDRIVE_API_TOKEN": "not-the-token",
        })
    assert code == 2
    assert "has 2 partitions, FUNNEL_PARTITIONS wants 4: use a new FUNNEL_APP_ID or FUNNEL_PARTITIONS=2" in (
        line(out, "FAIL", "topic 'crm.events'"))
    assert line(out, "FAIL", "Redis:")
    assert "HTTP 401 (check the access token)" in line(out, "FAIL", "pipedrive:")
    failures = [text for text in out if text.startswith("FAIL")]
    assert len(err) == 1, err
    assert err[0].startswith(f"funnel-kpi: check-config found {len(failures)} problems: "), err


def test_an_unreachable_broker_a_broken_config_and_a_bad_setting_are_not_tracebacks(tmp_path):
    config = tmp_path / "funnel.yaml"
    config.write_text("pipelines: [")
    code, out, err = check({"FUNNEL_BROKER": f"kafka://127.0.0.1:{free_port()}",
                            "FUNNEL_KAFKA_CONNECT_TIMEOUT": "1", "FUNNEL_CONFIG": str(config)})
    assert code == 2 and "no Kafka broker reachable" in line(out, "FAIL", "Kafka at")
    assert "not valid YAML" in line(out, "FAIL", "funnel config:")
    assert len(err) == 1 and "Traceback" not in "\n".join(out + err)
    code, _, err = check({"FUNNEL_PARTITIONS": "abc"})
    assert code == 2 and len(err) == 1
    assert err[0].startswith("funnel-kpi: invalid setting FUNNEL_PARTITIONS='abc'")
