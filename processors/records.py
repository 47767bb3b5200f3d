"""What a processor reads and rejects."""

from __future__ import annotations

from dataclasses import dataclass

from aiokafka.partitioner import murmur2


@dataclass(slots=True)
class Record:
    """One consumed message (aiokafka's ``ConsumerRecord`` has the same fields and is used as
    it is on the worker's path)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int | None = None  # the broker's (log-append or create) time, ms


@dataclass(slots=True)
class Rejection:
    """A record that goes to the DLQ: ``code`` labels the metric, ``reason`` tells a person."""

    record: Record
    code: str
    reason: str
    source: str = "unknown"  # the source label it is counted under


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) gives a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
