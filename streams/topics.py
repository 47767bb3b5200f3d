"""Topic names (docs/design.md §2, §5) and their creation with the configured partition count.

Brokers that auto-create topics (Tansu makes 4 partitions, Kafka ``num.partitions``) would
silently break co-partitioning, so every command creates its topics before producing and
refuses to run against a topic with another partition count.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError

EVENTS = "crm.events"
DLQ = "crm.events.dlq"
KPIS = "funnel.kpis"
ALERTS = "funnel.alerts"


def credits_topic(app_id: str) -> str:
    """Internal: won contributions of deals re-keyed by account (feeds the customers table)."""
    return f"{app_id}-customer-credits"


def ticks_topic(app_id: str) -> str:
    """Internal: periodic tick records, co-partitioned with crm.events, for work that writes
    tables on a schedule (Faust timers cannot write tables)."""
    return f"{app_id}-ticks"


def partials_topic(app_id: str) -> str:
    """Internal, one partition: per-partition partial aggregates for cross-partition checks."""
    return f"{app_id}-partials"


def worker_topics(app_id: str, partitions: int) -> dict[str, int]:
    """Every topic a worker needs before it starts, with its partition count."""
    return {
        EVENTS: partitions, DLQ: partitions, ALERTS: partitions, KPIS: partitions,
        credits_topic(app_id): partitions, ticks_topic(app_id): partitions,
        partials_topic(app_id): 1,
    }


class TopicMismatch(RuntimeError):
    """An existing topic has a partition count the worker cannot use."""


def bootstrap_servers(broker_url: str) -> list[str]:
    """``kafka://a:9092;b:9092`` → ``['a:9092', 'b:9092']``."""
    hosts = []
    for part in broker_url.replace(",", ";").split(";"):
        part = part.strip()
        if part:
            hosts.append(part.split("://", 1)[-1])
    return hosts


async def ensure_topics(
    broker_url: str, topics: dict[str, int], *, replication_factor: int = 1, timeout: float = 30.0
) -> None:
    """Create missing topics; raise :class:`TopicMismatch` if one exists with other partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(broker_url))
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
            NewTopic(name, partitions, replication_factor)
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
    finally:
        await admin.close()


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    counts = {}
    for meta in await admin.describe_topics(names):
        if meta.get("error_code", 0) == 0 and meta.get("partitions"):
            counts[meta["topic"]] = len(meta["partitions"])
    return counts
