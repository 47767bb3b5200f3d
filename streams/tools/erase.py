"""Erasure requests: one record per partition on the ticks topic, so every deal agent
pseudonymises the person in its own partition (inside stream processing, where tables may be
written) and remembers it for events still to come."""

from __future__ import annotations

import orjson
from aiokafka import AIOKafkaProducer

from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.kafka.settings import Settings


async def request_erasure(settings: Settings, name: str) -> None:
    await topics.ensure_topics(settings.broker, topics.worker_topics(settings.app_id, settings.partitions),
                               replication_factor=settings.replication_factor, app_id=settings.app_id)
    producer = AIOKafkaProducer(**kafka_client.client_args(settings.broker), acks="all")
    await producer.start()
    try:
        value = orjson.dumps({"erase": name})
        for partition in range(settings.partitions):
            await producer.send_and_wait(topics.ticks_topic(settings.app_id), value,
                                         partition=partition)
    finally:
        await producer.stop()
