"""Topics are created with the configured partition count before anything is produced; a
mismatch stops the worker with a clear message (brokers auto-create with their own default)."""

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from streams.kafka import topics

pytestmark = pytest.mark.broker


async def partition_counts(url, names):
    admin = AIOKafkaAdminClient(bootstrap_servers=topics.bootstrap_servers(url))
    await admin.start()
    try:
        return {m["topic"]: len(m["partitions"]) for m in await admin.describe_topics(names)}
    finally:
        await admin.close()


def test_topics_get_the_configured_partitions_and_a_mismatch_is_refused(broker):
    wanted = topics.worker_topics("funnel-kpi", 8)
    for _ in range(2):  # idempotent
        asyncio.run(topics.ensure_topics(broker.url, wanted, replication_factor=1, app_id="funnel-kpi"))
        assert asyncio.run(partition_counts(broker.url, list(wanted))) == wanted
    with pytest.raises(topics.TopicMismatch, match=r"'crm\.events' has 8 partitions.*configured for 6"):
        asyncio.run(topics.ensure_topics(broker.url, {topics.EVENTS: 6}, replication_factor=1))
