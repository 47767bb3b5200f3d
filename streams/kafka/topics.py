"""Topic names (docs/design.md §2, §5), the configs each is created with, and their creation.

Brokers that auto-create topics (Tansu makes 4 partitions, Kafka ``num.partitions``) would
silently break co-partitioning, and create topics with the broker's default retention (7 days
on Kafka), which would silently drop old deals from a rebuild. So every command creates its
topics with :func:`topic_configs` before producing, refuses a topic with another partition
count, and warns about an existing topic whose configs would lose data or let producers set the
record timestamps the stream clock relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

from streams.kafka.broker_check import check_broker
from streams.kafka.client import bootstrap_servers, client_args  # noqa: F401 (re-exported)
from streams.kafka.startup import StartupError

log = logging.getLogger("funnel_kpi")

EVENTS = "crm.events"
DLQ = "crm.events.dlq"
KPIS = "funnel.kpis"
# Header of each funnel.kpis message: the app id of the fleet that published it. A header, not a
# snapshot field: the schema forbids unknown fields, so consumers that validate keep working.
FLEET_HEADER = "funnel.fleet"
ALERTS = "funnel.alerts"
# Erasure requests (pseudonyms only), one fleet or many: a rebuild under a new app id applies them.
ERASURES = "funnel.erasures"
RAW_PREFIX = "crm.raw."
RAW_SOURCES = ("hubspot", "pipedrive", "salesforce", "debezium")
TABLES = ("deals", "customers")

DAY_MS = 86_400_000
# Every record kept: the topic is an input a rebuild replays (compaction would keep only a deal's
# last event and lose its stage history).
KEEP_ALL = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
# Latest value per key, forever: table changelogs and the latest KPI snapshot per pipeline.
COMPACTED = {"cleanup.policy": "compact"}
# The broker stamps each record when it appends it. The stream clock counts an event time only
# when not ahead of its record's timestamp (docs/design.md §2): with CreateTime, the default, that
# timestamp is whatever the producer set, and the guard against events dated ahead is the
# producer's word.
LOG_APPEND_TIME = {"message.timestamp.type": "LogAppendTime"}


def bounded(days: int) -> dict[str, str]:
    """Deleted after ``days``: records only read soon after they are written."""
    return {"cleanup.policy": "delete", "retention.ms": str(days * DAY_MS)}


# The one table of topic -> configs; docker-compose.yml's kafka-init creates the public topics
# with the same configs (tests/test_topic_configs.py checks they agree).
PUBLIC_TOPICS: dict[str, dict[str, str]] = {
    EVENTS: {**KEEP_ALL, **LOG_APPEND_TIME},
    DLQ: bounded(30),
    **{RAW_PREFIX + source: KEEP_ALL for source in RAW_SOURCES},
    KPIS: COMPACTED,
    ALERTS: bounded(30),
    ERASURES: COMPACTED,
}
INTERNAL_TOPICS: dict[str, dict[str, str]] = {  # by suffix after "<app_id>-"
    "customer-credits": KEEP_ALL,  # won credits not yet in the customers table
    "assignment": bounded(7),  # empty: the topic Faust assigns the tables' partitions by
    "partials": bounded(7),  # the publisher keeps only the latest per partition
    **{f"{table}-changelog": COMPACTED for table in TABLES},
}


def credits_topic(app_id: str) -> str:
    """Internal: won contributions of deals re-keyed by account (feeds the customers table)."""
    return f"{app_id}-customer-credits"


def assignment_topic(app_id: str) -> str:
    """Internal, co-partitioned with crm.events and never written: Faust assigns the tables'
    partitions by the topics its agents read, and the batch loop reads the inputs itself."""
    return f"{app_id}-assignment"


def partials_topic(app_id: str) -> str:
    """Internal, one partition: per-partition partial aggregates for cross-partition checks."""
    return f"{app_id}-partials"


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog."""
    return f"{app_id}-{table}-changelog"


def topic_configs(name: str, app_id: str | None = None) -> dict[str, str]:
    """The configs ``name`` is created with; raw topics are any ``crm.raw.*``. Topics outside the
    table (a Debezium topic named by its connector) are raw input: pass :data:`KEEP_ALL`."""
    if name in PUBLIC_TOPICS:
        return PUBLIC_TOPICS[name]
    if name.startswith(RAW_PREFIX):
        return KEEP_ALL
    if app_id and name.startswith(f"{app_id}-") and name[len(app_id) + 1:] in INTERNAL_TOPICS:
        return INTERNAL_TOPICS[name[len(app_id) + 1:]]
    raise KeyError(f"no configs for topic {name!r}: add it to streams/kafka/topics.py")


def worker_topics(app_id: str, partitions: int) -> dict[str, int]:
    """Every topic a worker needs before it starts, with its partition count (changelogs too:
    created here with their configs, Faust finds them)."""
    return {
        EVENTS: partitions, DLQ: partitions, ALERTS: partitions, KPIS: partitions,
        credits_topic(app_id): partitions, assignment_topic(app_id): partitions, ERASURES: 1,
        partials_topic(app_id): 1,
        **{changelog_topic(app_id, table): partitions for table in TABLES},
    }


def data_loss_risks(name: str, wanted: Mapping[str, str], found: Mapping[str, str]) -> list[str]:
    """Why an existing topic's configs (as the broker describes them) would lose data that
    ``wanted`` keeps; empty if none. Configs the broker does not report are not judged."""
    risks = []
    policy = found.get("cleanup.policy")
    if wanted.get("retention.ms") == "-1":
        for key in ("retention.ms", "retention.bytes"):
            if found.get(key) not in (None, "-1"):
                risks.append(f"{key}={found[key]} (older records are deleted, and a rebuild "
                             f"replays this topic)")
        if policy is not None and "compact" in policy:
            risks.append(f"cleanup.policy={policy} (compaction keeps only the last record per key)")
    if wanted.get("cleanup.policy") == "compact" and policy is not None and "compact" not in policy:
        risks.append(f"cleanup.policy={policy} (not compacted: old keys are deleted, and table "
                     f"recovery or a consumer starting from the beginning misses them)")
    fix = ",".join(f"{key}={value}" for key, value in wanted.items())
    return [f"topic {name!r} would lose data: {risk}; fix: kafka-configs.sh --alter --entity-type "
            f"topics --entity-name {name} --add-config {fix}" for risk in risks]


def timestamp_risks(name: str, wanted: Mapping[str, str], found: Mapping[str, str]) -> list[str]:
    """Why an existing topic's record timestamps (as the broker describes its configs) are not
    the broker's own that ``wanted`` asks for; empty if they are, or if the broker does not say
    (Tansu reports only configs set at creation)."""
    key = "message.timestamp.type"
    if key not in wanted or found.get(key) in (None, wanted[key]):
        return []
    return [f"topic {name!r} has {key}={found[key]}: its record timestamps are set by producers, "
            f"so the stream clock's guard against events dated ahead (docs/design.md §2) takes "
            f"their word; fix: kafka-configs.sh --alter --entity-type topics --entity-name {name} "
            f"--add-config {key}={wanted[key]}"]


class TopicMismatch(StartupError):
    """An existing topic has a partition count the worker cannot use."""


async def ensure_topics(
    broker_url: str, topics: dict[str, int], *, replication_factor: int,
    configs: Mapping[str, Mapping[str, str]] | None = None, app_id: str | None = None,
    timeout: float = 30.0,
) -> None:
    """Create missing topics with their configs (``configs``, else :func:`topic_configs`); raise
    :class:`TopicMismatch` if one exists with other partitions; warn about configs of existing
    topics that would lose data or take record timestamps from producers."""
    wanted = {name: dict(configs[name]) if configs and name in configs else topic_configs(name, app_id)
              for name in topics}
    await check_broker(broker_url)
    admin = AIOKafkaAdminClient(**client_args(broker_url))
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await admin.start()
            break
        except KafkaConnectionError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
    try:
        # Only list here: describing a missing topic makes auto-creating brokers create it
        # with their default partition count.
        present = set(await admin.list_topics())
        missing = [
            NewTopic(name, partitions, replication_factor, topic_configs=wanted[name])
            for name, partitions in topics.items() if name not in present
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
        existing = await _partition_counts(admin, list(topics))
        for name, partitions in topics.items():
            found = existing.get(name)
            if found != partitions:
                raise TopicMismatch(
                    f"topic {name!r} has {found} partitions, this deployment is configured for "
                    f"{partitions} (FUNNEL_PARTITIONS). Use a new app id / topic set, or set "
                    f"FUNNEL_PARTITIONS={found}."
                )
        described = await _configs(admin, sorted(present & set(topics)))
        for name, found_configs in described.items():
            for risk in [*data_loss_risks(name, wanted[name], found_configs),
                         *timestamp_risks(name, wanted[name], found_configs)]:
                log.warning("%s", risk)
    finally:
        await admin.close()


async def describe(admin: AIOKafkaAdminClient, names: Iterable[str]
                   ) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    """Partition counts and configs of those of ``names`` that exist, creating nothing (listed
    first: describing a missing topic makes auto-creating brokers create it)."""
    present = sorted(set(await admin.list_topics()) & set(names))
    return await _partition_counts(admin, present), await _configs(admin, present)


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    counts = {}
    for meta in await admin.describe_topics(names):
        if meta.get("error_code", 0) == 0 and meta.get("partitions"):
            counts[meta["topic"]] = len(meta["partitions"])
    return counts


async def _configs(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    """DescribeConfigs of existing topics: name -> {config: value} (Apache Kafka reports every
    config with its effective value; Tansu only those set at creation)."""
    if not names:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for error_code, _message, _type, name, entries in response.resources:
            if error_code == 0:
                configs[name] = {entry[0]: entry[1] for entry in entries if entry[1] is not None}
    return configs
