"""The last replay id per channel, kept in a compacted Kafka topic (``funnel.salesforce.replay``).

Written only after the raw topic acknowledged (acks=all) every event up to that replay id, so a
restart resumes (``CUSTOM``) after the last event known to be in Kafka: what was in flight is
fetched again, with the same event ids (duplicates the deal agent drops), and nothing is
skipped. In Kafka rather than in a file: the id describes the raw topic's contents and lives and
dies with them (a Kafka cluster restored or wiped cannot leave an id past events it no longer
holds), and the service needs no volume, so it can run anywhere. One partition, key
``<org id>:<channel>``, value ``{"replay_id": hex, "commit_timestamp": ms | null}``; compaction
keeps the latest per key, so reading it at start is short.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from streams.kafka import client as kafka_client
from streams.kafka import topics

log = logging.getLogger("funnel_kpi.salesforce_cdc")


@dataclass(frozen=True)
class Stored:
    replay_id: bytes
    commit_timestamp: int | None  # ms of the last change event written, None for a keep-alive id


def key_of(org_id: str, channel: str) -> str:
    return f"{org_id[:15]}:{channel}"


class ReplayStore:
    def __init__(self, broker: str, topic: str, producer: AIOKafkaProducer) -> None:
        self.broker = broker
        self.topic = topic
        self.producer = producer
        self.stored: dict[str, Stored] = {}

    async def ensure(self, replication_factor: int) -> None:
        await topics.ensure_topics(
            self.broker,
            {self.topic: 1},
            replication_factor=replication_factor,
            configs={self.topic: topics.COMPACTED},
        )

    async def load(self) -> dict[str, Stored]:
        """Every key's latest value, reading the topic from the start to its end."""
        consumer = AIOKafkaConsumer(
            **kafka_client.client_args(self.broker), group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            tp = TopicPartition(self.topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                batch = await consumer.getmany(tp, timeout_ms=1000)
                for record in batch.get(tp, []):
                    if record.key is None:
                        continue
                    if record.value is None:  # a tombstone: forget the channel
                        self.stored.pop(record.key.decode(), None)
                        continue
                    value = orjson.loads(record.value)
                    self.stored[record.key.decode()] = Stored(
                        bytes.fromhex(value["replay_id"]), value.get("commit_timestamp")
                    )
        finally:
            await consumer.stop()
        return self.stored

    async def save(self, key: str, stored: Stored) -> None:
        """Write and wait for the broker's acknowledgement (the producer has acks=all)."""
        value = {"replay_id": stored.replay_id.hex(), "commit_timestamp": stored.commit_timestamp}
        await (await self.producer.send(self.topic, orjson.dumps(value), key=key.encode()))
        self.stored[key] = stored

    async def forget(self, key: str) -> None:
        await (await self.producer.send(self.topic, None, key=key.encode()))
        self.stored.pop(key, None)
