"""The rates topic, followed outside the batch loop (docs/kpis.md, "Reporting currency")."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from models.rates import RateBook, parse_topic_record
from streams.kafka import client as kafka_client

log = logging.getLogger("funnel_kpi")


async def follow_rates(broker_url: str, topic: str, book: RateBook) -> None:
    """Read the compacted rates topic from its start and keep following it, outside the batch
    loop (rates are no deal state): each fetched batch becomes one new table of the book. A
    record that is not ``CUR:YYYY-MM-DD`` → a positive rate is named in a warning and skipped."""
    while True:
        consumer = AIOKafkaConsumer(topic, **kafka_client.client_args(broker_url),
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    group_id=None)
        try:
            await consumer.start()
            while True:
                records = []
                for messages in (await consumer.getmany(timeout_ms=1000)).values():
                    for message in messages:
                        try:
                            records.append(parse_topic_record(message.key, message.value))
                        except ValueError as exc:
                            log.warning("rates topic %s, offset %d: %s; skipped", topic,
                                        message.offset, exc)
                if records:
                    book.apply(records)
        except KafkaError as exc:
            log.warning("following %s failed (%s); retrying", topic, exc)
            await asyncio.sleep(2)
        finally:
            await consumer.stop()
