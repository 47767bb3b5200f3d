"""Erasure requests: the person's pseudonym on ``funnel.erasures`` (compacted, one partition,
shared by every fleet). Every worker reads the whole topic whenever it is assigned partitions:
it pseudonymises the person in the deals it owns and masks every later event, and a rebuild
under a new app id applies every erasure again, so a name erased once never comes back from
the raw events. The name itself is never written to Kafka."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
from aiokafka import AIOKafkaProducer

from models.deal import erased_name
from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.kafka.settings import Settings


async def request_erasure(settings: Settings, name: str) -> str:
    """Send the request; the pseudonym that replaces ``name``."""
    await topics.ensure_topics(settings.broker, {topics.ERASURES: 1},
                               replication_factor=settings.replication_factor, app_id=settings.app_id)
    pseudonym = erased_name(name)
    producer = AIOKafkaProducer(**kafka_client.client_args(settings.broker), acks="all")
    await producer.start()
    try:
        value = orjson.dumps({"pseudonym": pseudonym,
                              "requested_at": datetime.now(UTC).isoformat(timespec="seconds")})
        await producer.send_and_wait(topics.ERASURES, value, key=pseudonym.encode())
    finally:
        await producer.stop()
    return pseudonym
