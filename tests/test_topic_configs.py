"""Topics are created with the configs the design needs (one table, streams/kafka/topics.py), the
compose stack's kafka-init agrees with it, and a worker warns about an existing topic whose
configs would lose data, or whose record timestamps its producers set."""

from __future__ import annotations

import asyncio
import logging
import re
import shlex

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from streams.kafka import topics
from streams.kafka.settings import Settings
from tests.conftest import ROOT

WEEK_MS = "604800000"


def test_every_worker_topic_has_configs_and_inputs_keep_everything():
    for name in topics.worker_topics("funnel-kpi", 8):
        assert topics.topic_configs(name, "funnel-kpi")
    for name in (topics.EVENTS, "crm.raw.hubspot", "crm.raw.debezium", "funnel-kpi-customer-credits"):
        assert topics.topic_configs(name, "funnel-kpi")["retention.ms"] == "-1", name
    for name in (topics.KPIS, topics.ERASURES, "funnel-kpi-deals-changelog",
                 "funnel-kpi-customers-changelog"):
        assert topics.topic_configs(name, "funnel-kpi") == {"cleanup.policy": "compact"}, name
    assert topics.topic_configs(topics.DLQ)["retention.ms"] == str(30 * 86_400_000)
    with pytest.raises(KeyError, match="no configs for topic 'elsewhere'"):
        topics.topic_configs("elsewhere", "funnel-kpi")


def test_the_worker_declares_exactly_the_changelogs_it_creates_with_their_configs():
    from streams.worker.app import FunnelWorker

    worker = FunnelWorker(Settings(app_id="cfg-test", partitions=3))
    wanted = topics.worker_topics("cfg-test", 3)
    for table in worker.app.tables.values():
        changelog = table.changelog_topic
        assert wanted[changelog.get_topic_name()] == table.partitions
        assert changelog.config == {"cleanup.policy": "compact"}
    assert {f"cfg-test-{name}-changelog" for name in topics.TABLES} == {
        table.changelog_topic.get_topic_name() for table in worker.app.tables.values()}
    assert worker.assignment_topic.config == topics.topic_configs("cfg-test-assignment", "cfg-test")


def kafka_init_topics() -> dict[str, dict[str, str]]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    script = compose["services"]["kafka-init"]["command"][0]
    created = {}
    for line in script.splitlines():
        if line.startswith("create "):
            words = shlex.split(line)
            configs = [words[i + 1] for i, word in enumerate(words) if word == "--config"]
            created[words[1]] = dict(config.split("=", 1) for config in configs)
    return created


def test_compose_kafka_init_creates_every_public_topic_with_the_same_configs():
    assert kafka_init_topics() == topics.PUBLIC_TOPICS
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    init = compose["services"]["kafka-init"]
    assert '--replication-factor "$$REPLICATION"' in init["command"][0]
    assert init["environment"]["REPLICATION"] == "${FUNNEL_REPLICATION_FACTOR:-1}"


def test_data_loss_risks_name_the_topic_the_config_and_the_fix():
    keep = topics.KEEP_ALL
    assert topics.data_loss_risks("crm.events", keep, {}) == []
    assert topics.data_loss_risks("crm.events", keep, {"retention.ms": "-1", "cleanup.policy": "delete"}) \
        == []
    [risk] = topics.data_loss_risks("crm.events", keep, {"retention.ms": WEEK_MS})
    assert risk.startswith(f"topic 'crm.events' would lose data: retention.ms={WEEK_MS}")
    assert "--entity-name crm.events --add-config cleanup.policy=delete,retention.ms=-1" in risk
    [risk] = topics.data_loss_risks("crm.raw.hubspot", keep, {"cleanup.policy": "compact"})
    assert "cleanup.policy=compact" in risk
    assert len(topics.data_loss_risks("crm.events", keep, {"retention.bytes": "1073741824",
                                                           "retention.ms": "1"})) == 2
    [risk] = topics.data_loss_risks("x-deals-changelog", topics.COMPACTED, {"cleanup.policy": "delete"})
    assert "'x-deals-changelog' would lose data: cleanup.policy=delete (not compacted" in risk
    assert topics.data_loss_risks("funnel.kpis", topics.COMPACTED, {"cleanup.policy": "compact"}) == []


def test_crm_events_records_are_stamped_by_the_broker_and_another_type_is_named():
    # The stream clock counts an event time only when not ahead of its record's timestamp: a
    # guard only if the broker sets that timestamp, not the producer (docs/design.md §2).
    wanted = topics.topic_configs(topics.EVENTS)
    assert wanted.get("message.timestamp.type") == "LogAppendTime"
    [risk] = topics.timestamp_risks(topics.EVENTS, wanted, {"message.timestamp.type": "CreateTime"})
    assert risk.startswith("topic 'crm.events' has message.timestamp.type=CreateTime: ")
    assert risk.endswith("--entity-name crm.events --add-config message.timestamp.type=LogAppendTime")
    assert topics.timestamp_risks(topics.EVENTS, wanted, {}) == []  # Tansu: only configs set at creation
    assert topics.timestamp_risks(topics.EVENTS, wanted, {"message.timestamp.type": "LogAppendTime"}) == []
    assert topics.timestamp_risks(topics.DLQ, topics.topic_configs(topics.DLQ),
                                  {"message.timestamp.type": "CreateTime"}) == []


async def described(url: str, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.bootstrap_servers(url))
    await admin.start()
    try:
        return await topics._configs(admin, names)
    finally:
        await admin.close()


@pytest.mark.broker
def test_created_topics_carry_their_configs(broker):
    wanted = topics.worker_topics("funnel-kpi", 4)
    asyncio.run(topics.ensure_topics(broker.url, wanted, replication_factor=1, app_id="funnel-kpi"))
    raw = ["crm.raw.salesforce", "dbserver1.public.deals"]
    asyncio.run(topics.ensure_topics(broker.url, dict.fromkeys(raw, 4), replication_factor=1,
                                     configs=dict.fromkeys(raw, topics.KEEP_ALL)))
    # Tansu's DescribeConfigs answers with the configs set at creation: exactly ours.
    found = asyncio.run(described(broker.url, [*wanted, *raw]))
    for name in wanted:
        assert found[name] == topics.topic_configs(name, "funnel-kpi"), name
    for name in raw:
        assert found[name] == topics.KEEP_ALL, name


async def create_topic(url: str, name: str, partitions: int, configs: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.bootstrap_servers(url))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs)])
    finally:
        await admin.close()


@pytest.mark.broker
def test_a_worker_warns_about_crm_events_with_a_finite_retention(broker, workers):
    asyncio.run(create_topic(broker.url, topics.EVENTS, 4, {"retention.ms": WEEK_MS}))
    worker = workers()
    worker.wait_ready()
    log = worker.log_path.read_text()
    warning = re.search(r"WARNING funnel_kpi: topic 'crm.events' would lose data: "
                        rf"retention.ms={WEEK_MS} .*--add-config .*retention.ms=-1", log)
    assert warning, worker.log_tail()
    assert "would lose data" not in log.replace(warning.group(0), "")  # only the bad topic


@pytest.mark.broker
def test_start_up_names_an_existing_crm_events_whose_producers_set_the_timestamps(broker, caplog):
    asyncio.run(create_topic(broker.url, topics.EVENTS, 4, {"message.timestamp.type": "CreateTime"}))
    with caplog.at_level(logging.WARNING, logger="funnel_kpi"):
        asyncio.run(topics.ensure_topics(broker.url, topics.worker_topics("funnel-kpi", 4),
                                         replication_factor=1, app_id="funnel-kpi"))
    named = [record.getMessage() for record in caplog.records
             if "message.timestamp.type" in record.getMessage()]
    assert [message.split(":")[0] for message in named] == [
        "topic 'crm.events' has message.timestamp.type=CreateTime"]


@pytest.mark.broker
def test_a_worker_restarted_on_topics_it_created_warns_about_nothing(broker, workers):
    first = workers()
    first.wait_ready()
    first.stop()
    second = workers("w2")  # every topic exists now: all are described and judged
    second.wait_ready()
    logs = first.log_path.read_text() + second.log_path.read_text()
    assert "would lose data" not in logs and "message.timestamp.type" not in logs


@pytest.mark.broker
def test_ingest_and_adapt_warn_about_a_raw_topic_with_a_finite_retention(broker, caplog):
    from streams.http.ingest import ensure_raw_topics

    asyncio.run(create_topic(broker.url, "crm.raw.pipedrive", 4, {"retention.ms": WEEK_MS}))
    with caplog.at_level(logging.WARNING, logger="funnel_kpi"):
        asyncio.run(ensure_raw_topics(Settings(broker=broker.url, partitions=4),
                                      ["crm.raw.hubspot", "crm.raw.pipedrive"]))
    assert [record.getMessage().split(";")[0] for record in caplog.records] == [
        f"topic 'crm.raw.pipedrive' would lose data: retention.ms={WEEK_MS} (older records are "
        "deleted, and a rebuild replays this topic)"]
